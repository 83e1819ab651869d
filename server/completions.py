"""``POST /v1/completions``: prompts -> token ids -> engine -> text, JSON or SSE.

One engine request per (prompt, sample); choice ``index = prompt * n + i``.
Logprobs use OpenAI's legacy shape; with ``echo`` the prompt (and, with
``logprobs``, its logprobs, the first being null) comes first.
"""

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from batching.errors import InvalidRequestError
from batching.outputs import RequestOutput
from server.choices import merge, start_choices, unless_disconnected
from server.logprobs import LegacyLogprobs
from server.params import check_context, check_generation_request, sampling_params
from server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage, model_dump, new_id
from server.sse import sse_response
from server.state import Served, served

router = APIRouter()


def _check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of other than n is not supported", param="best_of")


def prompt_token_lists(body: CompletionRequest, state: Served) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of every prompt, and the prompt text where the client sent text."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(token, int) for token in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    token_lists, texts = [], []
    for item in items:
        if isinstance(item, str):
            token_lists.append(state.tokenizer(item).input_ids)
            texts.append(item)
        else:
            token_lists.append(list(item))
            texts.append(None)
        if not token_lists[-1]:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
    return token_lists, texts


class ChoiceText:
    """Accumulates one choice: echo prefix, text and legacy logprobs."""

    def __init__(
        self,
        state: Served,
        prompt_ids: list[int],
        prompt_text: str | None,
        echo: bool,
        want_logprobs: bool,
        skip_special_tokens: bool = True,
    ) -> None:
        self.prompt_ids = prompt_ids
        if echo and prompt_text is None:
            prompt_text = state.tokenizer.decode(prompt_ids, skip_special_tokens=skip_special_tokens)
        self.echo_text = prompt_text if echo else ""
        self.echo = echo
        self.want_logprobs = want_logprobs
        self.is_first = True
        self.text: list[str] = []
        self.logprobs = CompletionLogprobs()
        self._legacy = LegacyLogprobs(state.token_bytes, skip_special_tokens)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_output_tokens = 0

    def add(self, output: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        """The text and logprobs this delta contributes to the choice."""
        text, logprobs = output.new_text, CompletionLogprobs() if self.want_logprobs else None
        if self.is_first:
            self.is_first = False
            if self.echo:
                text = self.echo_text + text
                if logprobs is not None:
                    self._legacy.append(logprobs, self.prompt_ids[0], None)
                    for item in output.prompt_logprobs or []:
                        self._legacy.append(logprobs, item.token_id, item)
        if logprobs is not None:
            for item in output.logprobs:
                self._legacy.append(logprobs, item.token_id, item)
            for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, field).extend(getattr(logprobs, field))
        self.text.append(text)
        self.num_output_tokens = output.num_output_tokens
        self.finish_reason = output.finish_reason
        self.stop_reason = output.stop_reason
        return text, logprobs


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, raw_request: Request, state: Served = Depends(served)
) -> JSONResponse | EventSourceResponse:
    created = int(time.time())  # arrival: the same value in every chunk and in the JSON body
    _check_supported(body)
    check_generation_request(body, state)
    prompts, texts = prompt_token_lists(body, state)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    for prompt in prompts:
        check_context(len(prompt), max_tokens, state)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = sampling_params(body, max_tokens, body.logprobs, prompt_logprobs)
    request_id = new_id("cmpl")
    raw_request.state.request_id = request_id
    choices = await start_choices(state, prompts, params, body.n, request_id)
    accumulators = {
        choice.index: ChoiceText(
            state, choice.prompt_token_ids, texts[choice.index // body.n], body.echo, body.logprobs is not None, body.skip_special_tokens
        )
        for choice in choices
    }
    usage_prompt_tokens = sum(len(prompt) for prompt in prompts)
    settings = raw_request.app.state.settings
    outputs = merge(state, choices, raw_request.app.state.metrics, settings.request_timeout)
    header = {"id": request_id, "created": created, "model": state.model_name}  # every body and chunk starts so
    if body.stream:
        return sse_response(_stream(outputs, accumulators, header, usage_prompt_tokens, body), settings)
    return JSONResponse(await unless_disconnected(raw_request, _collect(outputs, accumulators, header, usage_prompt_tokens)))


def _usage(prompt_tokens: int, accumulators: dict[int, ChoiceText]) -> Usage:
    completion_tokens = sum(acc.num_output_tokens for acc in accumulators.values())
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


async def _collect(
    outputs: AsyncIterator[tuple[int, RequestOutput]], accumulators: dict[int, ChoiceText], header: dict, prompt_tokens: int
) -> dict:
    async for index, output in outputs:
        accumulators[index].add(output)
    choices = [
        CompletionChoice(
            index=index,
            text="".join(acc.text),
            logprobs=acc.logprobs if acc.want_logprobs else None,
            finish_reason=acc.finish_reason,
            stop_reason=acc.stop_reason,
        )
        for index, acc in sorted(accumulators.items())
    ]
    return model_dump(CompletionResponse(**header, choices=choices, usage=_usage(prompt_tokens, accumulators)))


async def _stream(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    accumulators: dict[int, ChoiceText],
    header: dict,
    prompt_tokens: int,
    body: CompletionRequest,
) -> AsyncIterator[str]:
    try:
        async for index, output in outputs:
            text, logprobs = accumulators[index].add(output)
            if not text and not output.is_finished and not (logprobs and logprobs.tokens):
                continue
            choice = CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=output.finish_reason, stop_reason=output.stop_reason
            )
            usage = _usage(prompt_tokens, accumulators) if body.continuous_usage else None
            yield json.dumps(model_dump(CompletionResponse(**header, choices=[choice], usage=usage)))
        if body.include_usage:
            usage = _usage(prompt_tokens, accumulators)
            yield json.dumps(model_dump(CompletionResponse(**header, choices=[], usage=usage)))
        yield "[DONE]"
    finally:
        await outputs.aclose()
