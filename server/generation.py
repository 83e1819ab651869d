"""Shared by the completion and chat routes: request fields -> ``SamplingParams``,
prompts -> admitted engine requests (one per prompt x ``n``), and the merged
stream of their deltas tagged with the OpenAI choice ``index``.

Every prompt is validated, and the queue checked (503 when full), before any
is queued. Consumers that stop early (client gone, error, ``--request-timeout``)
cancel the merge, which aborts every unfinished request. Errors after
admission are raised from the merge as ``TokenstepError``: the error handler
turns them into JSON for a non-streaming response, and ``sse_response``
into a final error event followed by ``data: [DONE]`` for a stream.
"""

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from sse_starlette import EventSourceResponse

from batching.errors import InvalidRequestError, TokenstepError
from batching.outputs import RequestOutput
from batching.sampling_params import SamplingParams
from batching.structured import GuidedDecoding
from server.app import Served
from server.errors import ClientDisconnected, error_type_for
from server.metrics import Metrics, RequestTimer
from server.protocol import SamplingFields
from server.settings import Settings
from server.shutdown import sse_grace_period_s

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
SSE_PING_S = 15
logger = logging.getLogger(__name__)


class EngineFailedError(TokenstepError):
    """The engine ended an admitted request with an error (500; 503 when shutting down)."""

    http_status = 500
    error_type = "server_error"


class RequestTimeoutError(TokenstepError):
    """The request ran longer than ``--request-timeout`` (HTTP 504)."""

    http_status = 504
    error_type = "server_error"
    code = "request_timeout"


def output_error(output: RequestOutput) -> EngineFailedError:
    """The exception for an error delta, with the status the engine chose."""
    error = EngineFailedError(output.error or "the engine failed this request")
    error.http_status = output.error_status
    return error


def error_event(message: str, status: int = 500) -> str:
    """An SSE ``data`` payload in OpenAI's error shape (code: the HTTP status)."""
    return json.dumps({"error": {"message": message, "type": error_type_for(status), "param": None, "code": status}})


def guided_decoding(body: SamplingFields) -> GuidedDecoding | None:
    """The request's output constraint: ``response_format`` or one ``guided_*``
    field (400 if several are given). The grammar compiles later, in the engine."""
    given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar") if getattr(body, name) is not None]
    response_format = body.response_format
    if response_format is not None and response_format.type != "text":
        given.insert(0, "response_format")
    if len(given) > 1:
        raise InvalidRequestError(f"give one output constraint, not several: {', '.join(given)}", param=given[1])
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        if response_format.type == "json_object":
            return GuidedDecoding.json_object()
        spec = response_format.json_schema
        if spec is None:
            raise InvalidRequestError("response_format of type json_schema needs a json_schema object", param="response_format")
        return GuidedDecoding.json_schema(spec.schema_ if spec.schema_ is not None else {"type": "object"}, "response_format")
    if name == "guided_json":
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"guided_json is not valid JSON: {exc}", param="guided_json") from None
        return GuidedDecoding.json_schema(schema, "guided_json")
    if name == "guided_regex":
        return GuidedDecoding.regex(body.guided_regex)
    if name == "guided_choice":
        return GuidedDecoding.choice(body.guided_choice)
    return GuidedDecoding.lark(body.guided_grammar)


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None, guided: GuidedDecoding | None = None) -> SamplingParams:
    """``guided``: a constraint the route imposes itself (a forced tool call);
    it may not be combined with one from the request body."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        logit_bias = {int(token): bias for token, bias in (body.logit_bias or {}).items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None
    return SamplingParams(
        max_tokens=max_tokens,
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
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        guided=_one_constraint(guided, guided_decoding(body)),
    )


def _one_constraint(imposed: GuidedDecoding | None, requested: GuidedDecoding | None) -> GuidedDecoding | None:
    if imposed is not None and requested is not None:
        raise InvalidRequestError(f"a forced tool call cannot be combined with {requested.param}", param=requested.param)
    return imposed or requested


def check_model(requested: str | None, state: Served) -> None:
    if requested and requested != state.model_name and requested != state.model_root:
        raise ModelNotFoundError(f"The model `{requested}` does not exist. Available: {state.model_name}", param="model")


class ModelNotFoundError(InvalidRequestError):
    http_status = 404
    error_type = "not_found_error"
    code = "model_not_found"


def check_context(num_prompt_tokens: int, max_tokens: int, state: Served, max_tokens_param: str = "max_tokens", prompt_param: str = "prompt") -> None:
    """Prompt + max_tokens must fit the context window (400 naming both numbers
    and, as ``param``, the field the client sent: ``max_tokens_param`` when the
    prompt alone fits, else ``prompt_param``)."""
    if num_prompt_tokens + max_tokens > state.max_model_len:
        error = InvalidRequestError(
            f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or {max_tokens_param}.",
            param=max_tokens_param if num_prompt_tokens < state.max_model_len else prompt_param,
        )
        error.code = "context_length_exceeded"
        raise error


def default_max_tokens(num_prompt_tokens: int, state: Served) -> int:
    """The rest of the context window (and of the KV cache), as vLLM does."""
    limit = min(state.max_model_len, state.batcher.kv_capacity_tokens)
    return max(limit - num_prompt_tokens, 1)


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    stream: AsyncIterator[RequestOutput]


async def start_choices(state: Served, prompts: list[list[int]], params: SamplingParams, n: int, request_id: str) -> list[Choice]:
    """Admit ``len(prompts) * n`` requests; choice ``index = prompt * n + i``.

    With a seed and ``n > 1``, choice i uses ``seed + i`` so the n samples
    differ yet the whole response stays reproducible.
    """
    state.batcher.check_admission(len(prompts) * n)
    choices: list[Choice] = []
    try:
        for prompt_index, prompt in enumerate(prompts):
            for sample_index in range(n):
                choice_params = params
                if params.seed is not None and sample_index:
                    choice_params = dataclasses.replace(params, seed=params.seed + sample_index)
                index = prompt_index * n + sample_index
                choice_id = f"{request_id}-{index}"
                stream = await state.batcher.generate(prompt, choice_params, choice_id)
                choices.append(Choice(index, choice_id, prompt, stream))
    except BaseException:
        for choice in choices:
            state.batcher.abort(choice.request_id)
        raise
    return choices


async def merge(state: Served, choices: list[Choice], metrics: Metrics, timeout_s: float | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the choices' deltas as they arrive, tagged with their index,
    observing each choice's latency metrics on the way.

    An error delta raises ``EngineFailedError``; running past ``timeout_s``
    seconds (None or 0: no limit) raises ``RequestTimeoutError``. However the
    consumer stops, every unfinished choice is aborted (a no-op for finished
    ones), so no request outlives its HTTP response and its blocks go back.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None

    async def pump(choice: Choice) -> None:
        timer = RequestTimer(metrics)
        try:
            async for output in choice.stream:
                timer.on_tokens(len(output.new_token_ids), output.queue_time_s)
                if output.is_finished:
                    timer.on_finish()
                queue.put_nowait((choice.index, output))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await _next_before(queue, deadline, timeout_s)
            if item is None:
                remaining -= 1
            elif item[1].error:
                raise output_error(item[1])
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for choice in choices:
            state.batcher.abort(choice.request_id)


async def _next_before(queue: asyncio.Queue[T], deadline: float | None, timeout_s: float | None) -> T:
    """``queue.get()``, or ``RequestTimeoutError`` once the loop clock passes ``deadline``."""
    if deadline is None:
        return await queue.get()
    remaining_s = max(deadline - asyncio.get_running_loop().time(), 0.0)
    try:
        return await asyncio.wait_for(queue.get(), remaining_s)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the request took longer than the server's request timeout ({timeout_s:g} s)") from None


def sse_response(events: AsyncGenerator[str, None], settings: Settings) -> EventSourceResponse:
    """Stream ``events`` as SSE; an error raised mid-stream becomes a final
    error event and ``data: [DONE]``, so a stream always ends properly."""
    return EventSourceResponse(_ending_properly(events), sep="\n", ping=SSE_PING_S, shutdown_grace_period=sse_grace_period_s(settings))


async def _ending_properly(events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except TokenstepError as exc:
        yield error_event(exc.message, exc.http_status)
        yield "[DONE]"
    except Exception:
        logger.exception("a response stream failed")
        yield error_event("internal server error", 500)
        yield "[DONE]"
    finally:
        await events.aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (aborting its requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
