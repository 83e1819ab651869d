"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

The route is the chat route with another wire shape: ``input`` (plus the
stored conversation of ``previous_response_id``, plus ``instructions`` as
this turn's system message) becomes chat messages, rendered by
``server.chat_prompt`` with the request's tools; one engine request runs
through the same ``merge`` as chat (disconnects abort it within a step);
``server.response_events.ResponseBuilder`` makes the output items and, when
streaming, OpenAI's typed events. With ``store`` (default true) the finished
response and its conversation go into the app's ``ResponseStore``.
"""

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from batching.errors import TokenstepError
from batching.outputs import RequestOutput
from server.chat import ReplyShape
from server.chat_prompt import build_chat_prompt
from server.choices import merge, start_choices, unless_disconnected
from server.errors import ResponseNotFoundError
from server.params import check_context, check_generation_request, default_max_tokens, sampling_params
from server.response_events import ResponseBuilder, new_item_id
from server.response_store import ResponseStore, StoredResponse
from server.responses_protocol import ResponsesRequest, check_supported, input_messages, template_fields
from server.sse import sse_response, typed_events
from server.state import Served, served

router = APIRouter()


def _store(raw_request: Request) -> ResponseStore:
    return raw_request.app.state.responses


def _stored(raw_request: Request, response_id: str, param: str | None = None) -> StoredResponse:
    entry = _store(raw_request).get(response_id)
    if entry is None:
        raise ResponseNotFoundError(f"Response with id '{response_id}' not found (never stored, deleted, or evicted).", param=param)
    return entry


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, raw_request: Request, state: Served = Depends(served)
) -> JSONResponse | EventSourceResponse:
    created_at = int(time.time())
    check_supported(body, state.thinks)
    check_generation_request(body, state)
    history = _stored(raw_request, body.previous_response_id, "previous_response_id").conversation if body.previous_response_id else []
    conversation = history + input_messages(body.input, state.thinks)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat_prompt = build_chat_prompt(state, system + conversation, template_fields(body))
    prompt, plan = chat_prompt.token_ids, chat_prompt.plan
    max_tokens = body.max_output_tokens or default_max_tokens(len(prompt), state)
    check_context(len(prompt), max_tokens, state, "max_output_tokens", prompt_param="input")
    text_format = body.text.format if body.text else None
    sampling_body = body.model_copy(update={"response_format": text_format.response_format()}) if text_format else body
    logprobs = (body.top_logprobs or 0) if body.wants_logprobs else None
    thinking = state.thinking_spec(chat_prompt.opens_reasoning, body.max_reasoning_tokens)
    params = sampling_params(
        sampling_body, max_tokens, logprobs, plan=plan, thinking=thinking, keep_special_tokens=state.keeps_special_tokens
    )
    response_id = new_item_id("resp")
    raw_request.state.request_id = response_id
    choices = await start_choices(state, [prompt], params, 1, response_id)
    settings = raw_request.app.state.settings
    outputs = merge(state, choices, raw_request.app.state.metrics, settings.request_timeout)
    reply = ReplyShape(state, response_id, created_at, len(prompt), plan, body.skip_special_tokens, chat_prompt.opens_reasoning)
    builder = ResponseBuilder(reply, _skeleton(body, response_id, created_at, state.model_name), body.wants_logprobs)
    finish = _finisher(raw_request, body, builder, conversation)
    if body.stream:
        # An error after the start is OpenAI's ``error`` event (no ``[DONE]``:
        # the Responses stream ends with its last typed event).
        def error_event(exc: TokenstepError) -> dict[str, Any]:
            return builder.error_event(exc.code or str(exc.http_status), exc.message, exc.param)

        return sse_response(typed_events(builder, outputs, error_event, finish), settings)
    return JSONResponse(await unless_disconnected(raw_request, _collect(builder, outputs, finish)))


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, raw_request: Request) -> dict[str, Any]:
    return _stored(raw_request, response_id).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, raw_request: Request) -> dict[str, Any]:
    if not _store(raw_request).delete(response_id):
        raise ResponseNotFoundError(f"Response with id '{response_id}' not found.")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _skeleton(body: ResponsesRequest, response_id: str, created_at: int, model_name: str) -> dict[str, Any]:
    """The response's fields that echo the request."""
    text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text else {"type": "text"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "model": model_name,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": text_format},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_logprobs": body.top_logprobs,
        "truncation": "disabled",
        "user": body.user,
        "background": False,
        "reasoning": body.reasoning,
    }


Finish = Callable[[], dict[str, Any]]


def _finisher(raw_request: Request, body: ResponsesRequest, builder: ResponseBuilder, conversation: list[dict[str, Any]]) -> Finish:
    """What runs once the response is complete: store it with its conversation."""

    def finish() -> dict[str, Any]:
        response = builder.response
        if body.store:
            reply: dict[str, Any] = {"role": "assistant", "content": builder.text}
            if builder.calls:
                reply["tool_calls"] = builder.calls
            _store(raw_request).put(StoredResponse(response, conversation + [reply]))
        return response

    return finish


async def _collect(builder: ResponseBuilder, outputs: AsyncIterator[tuple[int, RequestOutput]], finish: Finish) -> dict[str, Any]:
    builder.start()
    async for _, output in outputs:
        builder.feed(output)
    return finish()
