"""``POST /v1/completions``: prompt -> tokens -> engine -> text, JSON or SSE."""

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from batching.errors import InvalidRequestError
from batching.outputs import RequestOutput
from batching.sampling_params import SamplingParams
from server.app import Served, served
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage, model_dump, new_id

router = APIRouter()


def sampling_params(body: CompletionRequest) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        logit_bias = {int(token): bias for token, bias in (body.logit_bias or {}).items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None
    return SamplingParams(
        max_tokens=body.max_tokens if body.max_tokens is not None else 16,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        logit_bias=logit_bias,
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        skip_special_tokens=body.skip_special_tokens,
    )


def _check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of > body.n:
        raise InvalidRequestError("best_of > n is not supported", param="best_of")
    if body.n != 1:
        raise InvalidRequestError("n > 1 is not supported yet", param="n")
    if body.echo:
        raise InvalidRequestError("echo is not supported yet", param="echo")
    if body.logprobs is not None:
        raise InvalidRequestError("logprobs are not supported yet", param="logprobs")


def prompt_token_ids(body: CompletionRequest, state: Served) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return state.tokenizer(prompt).input_ids
    if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
        return list(prompt)
    raise InvalidRequestError("several prompts in one request are not supported yet", param="prompt")


def _check_length(token_ids: list[int], max_tokens: int, state: Served) -> None:
    if len(token_ids) + max_tokens > state.max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context length is {state.max_model_len} tokens; the prompt has "
            f"{len(token_ids)} tokens and max_tokens is {max_tokens}",
            param="max_tokens",
        )


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, state: Served = Depends(served)) -> JSONResponse | EventSourceResponse:
    _check_supported(body)
    params = sampling_params(body)
    token_ids = prompt_token_ids(body, state)
    _check_length(token_ids, params.max_tokens, state)
    request_id = new_id("cmpl")
    stream = await state.batcher.generate(token_ids, params, request_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_sse(stream, request_id, state.model_name, include_usage), ping=15)
    return JSONResponse(await _collect(stream, request_id, state.model_name))


async def _collect(stream: AsyncIterator[RequestOutput], request_id: str, model_name: str) -> dict:
    text: list[str] = []
    last: RequestOutput | None = None
    async for output in stream:
        text.append(output.new_text)
        last = output
    if last.error:
        raise RuntimeError(last.error)
    choice = CompletionChoice(index=0, text="".join(text), finish_reason=last.finish_reason, stop_reason=last.stop_reason)
    usage = Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=last.num_output_tokens, total_tokens=last.num_prompt_tokens + last.num_output_tokens)
    return model_dump(CompletionResponse(id=request_id, model=model_name, choices=[choice], usage=usage))


async def _sse(stream: AsyncIterator[RequestOutput], request_id: str, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    last: RequestOutput | None = None
    async for output in stream:
        last = output
        if output.error:
            yield json.dumps({"error": {"message": output.error, "type": "internal_error", "param": None, "code": 500}})
            break
        if not output.new_text and not output.is_finished:
            continue
        choice = CompletionChoice(index=0, text=output.new_text, finish_reason=output.finish_reason, stop_reason=output.stop_reason)
        yield json.dumps(model_dump(CompletionResponse(id=request_id, model=model_name, choices=[choice])))
    if include_usage and last is not None:
        usage = Usage(prompt_tokens=last.num_prompt_tokens, completion_tokens=last.num_output_tokens, total_tokens=last.num_prompt_tokens + last.num_output_tokens)
        yield json.dumps(model_dump(CompletionResponse(id=request_id, model=model_name, choices=[], usage=usage)))
    yield "[DONE]"
