"""``POST /v1/chat/completions``: messages -> chat template -> engine -> message.

The template is rendered to text by the tokenizer (``--chat-template FILE``
overrides the model's) and tokenized WITHOUT adding special tokens again: the
template already has them, and a doubled BOS silently degrades answers.
Streaming sends ``role: assistant`` first, then content deltas, then a chunk
carrying ``finish_reason``. With ``tools``, ``server.tools`` renders them into
the prompt, may constrain the output to calls, and splits the text into
content and ``tool_calls`` (``finish_reason: tool_calls`` when there are any).
"""

import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from batching.errors import InvalidRequestError
from batching.messages import TokenLogprobs
from batching.outputs import RequestOutput
from server.app import Served, served
from server.generation import check_context, check_model, default_max_tokens, merge, sampling_params, sse_response, start_choices, unless_disconnected
from server.protocol import (
    AssistantMessage,
    ToolCall,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
    model_dump,
    new_id,
)
from server.tools import ToolCallParser, ToolPlan, plan_tools, template_handles_tools, template_messages

router = APIRouter()


def _check_supported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")


def _message_dicts(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for position, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            non_text = [part.type for part in content if part.type != "text"]
            if non_text:
                raise InvalidRequestError(f"content part type {non_text[0]!r} is not supported (text only)", param=f"messages.{position}.content")
            content = "".join(part.text or "" for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        extra = message.model_extra or {}
        if message.role == "assistant" and extra.get("tool_calls"):
            if not isinstance(extra["tool_calls"], list):
                raise InvalidRequestError("tool_calls must be a list", param=f"messages.{position}.tool_calls")
            entry["tool_calls"] = extra["tool_calls"]
        if message.role == "tool":
            if not isinstance(extra.get("tool_call_id"), str):
                raise InvalidRequestError("a tool message needs the tool_call_id it answers", param=f"messages.{position}.tool_call_id")
            entry["tool_call_id"] = extra["tool_call_id"]
        messages.append(entry)
    return messages


def chat_template(state: Served) -> str:
    template = state.chat_template or getattr(state.tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError("this model has no chat template; start the server with --chat-template FILE", param="messages")
    return template


def render_chat(state: Served, messages: list[dict[str, Any]], add_generation_prompt: bool = True, continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Chat messages -> prompt token ids through the chat template."""
    template = chat_template(state)
    try:
        text = state.tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # a template error is the request's fault (roles, ordering)
        raise InvalidRequestError(f"the chat template could not render these messages: {exc}", param="messages") from None
    return state.tokenizer(text, add_special_tokens=False).input_ids


def _chat_logprobs(state: Served, items: list[TokenLogprobs]) -> ChatChoiceLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = state.tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for item in items:
        chosen = entry(item.token_id, item.logprob)
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[entry(t, lp) for t, lp in item.top]))
    return ChatChoiceLogprobs(content=content)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request, state: Served = Depends(served)) -> JSONResponse | EventSourceResponse:
    _check_supported(body)
    check_model(body.model, state)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    messages, tool_kwargs = template_messages(_message_dicts(body), plan, template_handles_tools(chat_template(state)))
    prompt = render_chat(state, messages, body.add_generation_prompt, body.continue_final_message, {**tool_kwargs, **(body.chat_template_kwargs or {})})
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens(len(prompt), state)
    check_context(len(prompt), max_tokens, state)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs, guided=plan.guided() if plan else None)
    request_id = new_id("chatcmpl")
    choices = await start_choices(state, [prompt], params, body.n, request_id)
    settings = raw_request.app.state.settings
    outputs = merge(state, choices, raw_request.app.state.metrics, settings.request_timeout)
    parser_factory = _parser_factory(plan)
    if body.stream:
        return sse_response(_stream(state, outputs, request_id, len(prompt), body, parser_factory), settings)
    return JSONResponse(await unless_disconnected(raw_request, _collect(state, outputs, request_id, len(prompt), parser_factory)))


def _finish_reason(output: RequestOutput, calls: list[dict[str, Any]]) -> str | None:
    return "tool_calls" if calls and output.finish_reason == "stop" else output.finish_reason


ParserFactory = Callable[[], ToolCallParser] | None


def _parser_factory(plan: ToolPlan | None) -> ParserFactory:
    """How each choice's text is split into content and calls (None: it is not)."""
    if plan is None or not plan.parses_calls:
        return None
    return functools.partial(ToolCallParser, keep_partial=not plan.is_forced)


def _message(text: str, parser_factory: ParserFactory) -> AssistantMessage:
    if parser_factory is None:
        return AssistantMessage(content=text)
    parser = parser_factory()
    content, _ = parser.feed(text)
    rest, _ = parser.finish()
    content += rest
    return AssistantMessage(content=content or None, tool_calls=[ToolCall(**call) for call in parser.calls] or None)


async def _collect(state: Served, outputs: AsyncIterator[tuple[int, RequestOutput]], request_id: str, prompt_tokens: int, parser_factory: ParserFactory) -> dict:
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprobs]] = {}
    last: dict[int, RequestOutput] = {}
    want_logprobs = False
    async for index, output in outputs:
        texts.setdefault(index, []).append(output.new_text)
        logprobs.setdefault(index, []).extend(output.logprobs)
        want_logprobs = want_logprobs or bool(output.logprobs)
        last[index] = output
    messages = {index: _message("".join(texts[index]), parser_factory) for index in last}
    choices = [
        ChatChoice(
            index=index,
            message=messages[index],
            logprobs=_chat_logprobs(state, logprobs[index]) if want_logprobs else None,
            finish_reason=_finish_reason(output, messages[index].tool_calls or []),
            stop_reason=output.stop_reason,
        )
        for index, output in sorted(last.items())
    ]
    completion_tokens = sum(output.num_output_tokens for output in last.values())
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
    return model_dump(ChatCompletionResponse(id=request_id, model=state.model_name, choices=choices, usage=usage))


def _chunk(request_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> str:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


async def _stream(state: Served, outputs: AsyncIterator[tuple[int, RequestOutput]], request_id: str, prompt_tokens: int, body: ChatCompletionRequest, parser_factory: ParserFactory) -> AsyncIterator[str]:
    created = int(time.time())
    started: set[int] = set()
    completion_tokens: dict[int, int] = {}
    parsers: dict[int, ToolCallParser] = {}
    try:
        async for index, output in outputs:
            if index not in started:
                started.add(index)
                if parser_factory is not None:
                    parsers[index] = parser_factory()
                yield _chunk(request_id, created, state.model_name, [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            completion_tokens[index] = output.num_output_tokens
            logprobs = model_dump(_chat_logprobs(state, output.logprobs)) if output.logprobs else None
            content, calls = output.new_text, []
            parser = parsers.get(index)
            if parser is not None:
                content, calls = parser.feed(content)
                if output.is_finished:
                    rest, last_calls = parser.finish()
                    content, calls = content + rest, calls + last_calls
            if content or logprobs:
                yield _chunk(request_id, created, state.model_name, [{"index": index, "delta": {"content": content}, "logprobs": logprobs, "finish_reason": None}])
            if calls:
                first = len(parser.calls) - len(calls)
                fragments = [{"index": first + i, **call} for i, call in enumerate(calls)]
                yield _chunk(request_id, created, state.model_name, [{"index": index, "delta": {"tool_calls": fragments}, "logprobs": None, "finish_reason": None}])
            if output.is_finished:
                finish_reason = _finish_reason(output, parser.calls if parser else [])
                yield _chunk(request_id, created, state.model_name, [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason, "stop_reason": output.stop_reason}])
        if body.include_usage:
            total = sum(completion_tokens.values())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total}
            yield _chunk(request_id, created, state.model_name, [], usage)
        yield "[DONE]"
    finally:
        await outputs.aclose()
