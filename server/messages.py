"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API.

The route is the chat route with Anthropic's wire shape: ``system`` and
``messages`` become chat messages (``server.messages_protocol``), rendered by
``server.chat_prompt`` with the request's tools; one engine request runs
through the same ``merge`` as chat (disconnects abort it within a step);
``server.message_events.MessageBuilder`` makes the content blocks and, when
streaming, Anthropic's typed events. Errors on these paths take Anthropic's
shape (``server.errors``), and the API key may come as ``x-api-key``.
"""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from batching.outputs import RequestOutput
from server.chat import ReplyShape
from server.chat_prompt import ChatPrompt, build_chat_prompt
from server.choices import merge, start_choices, unless_disconnected
from server.errors import anthropic_error_body
from server.message_events import MessageBuilder, new_message_id
from server.messages_protocol import (
    CountTokensRequest,
    MessagesRequest,
    chat_messages,
    check_supported,
    ends_in_prefill,
    sampling_fields,
    template_fields,
    thinking_budget,
)
from server.params import check_context, check_generation_request, check_model, sampling_params
from server.sse import sse_response, typed_events
from server.state import Served, served

router = APIRouter()


def _prompt(body: MessagesRequest, state: Served) -> ChatPrompt:
    check_supported(body, state.thinks)
    messages = chat_messages(body)
    return build_chat_prompt(state, messages, template_fields(body, ends_in_prefill(messages)))


@router.post("/v1/messages", response_model=None)
async def create_message(
    body: MessagesRequest, raw_request: Request, state: Served = Depends(served)
) -> JSONResponse | EventSourceResponse:
    fields = sampling_fields(body)
    check_generation_request(fields, state)
    chat_prompt = _prompt(body, state)
    prompt, plan = chat_prompt.token_ids, chat_prompt.plan
    check_context(len(prompt), body.max_tokens, state, "max_tokens", prompt_param="messages")
    thinking = state.thinking_spec(chat_prompt.opens_reasoning, thinking_budget(body))
    params = sampling_params(fields, body.max_tokens, None, plan=plan, thinking=thinking, keep_special_tokens=state.keeps_special_tokens)
    message_id = new_message_id()
    raw_request.state.request_id = message_id
    choices = await start_choices(state, [prompt], params, 1, message_id)
    settings = raw_request.app.state.settings
    outputs = merge(state, choices, raw_request.app.state.metrics, settings.request_timeout)
    reply = ReplyShape(state, message_id, 0, len(prompt), plan, skip_special_tokens=True, opens_reasoning=chat_prompt.opens_reasoning)
    builder = MessageBuilder(reply, message_id, state.model_name)
    if body.stream:
        # A failure after the start is Anthropic's ``error`` event, which ends the stream.
        return sse_response(typed_events(builder, outputs, lambda exc: anthropic_error_body(exc.http_status, exc.message)), settings)
    return JSONResponse(await unless_disconnected(raw_request, _collect(builder, outputs)))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, state: Served = Depends(served)) -> dict[str, int]:
    """The prompt tokens ``/v1/messages`` would see for this body (its ``usage.input_tokens``)."""
    check_model(body.model, state)
    return {"input_tokens": len(_prompt(body, state).token_ids)}


async def _collect(builder: MessageBuilder, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
    async for _, output in outputs:
        builder.feed(output)
    return builder.message
