"""``POST /v1/chat/completions``: messages -> chat template -> engine -> message.

The prompt is rendered by ``server.chat_prompt`` (shared with /v1/responses
and /tokenize). ``created`` is the arrival time, the same in every chunk and
in the non-streamed body. Streaming sends ``role: assistant`` first, then content deltas, then a chunk
carrying ``finish_reason``. With ``tools``, ``server.tools`` renders them into
the prompt, may constrain the output to calls, and splits the text into
content and ``tool_calls`` (``finish_reason: tool_calls`` when there are any; see ``finish_reason``).
"""

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from batching.errors import InvalidRequestError
from batching.messages import TokenLogprobs
from batching.outputs import RequestOutput
from server.chat_prompt import build_chat_prompt, message_dicts
from server.choices import merge, start_choices, unless_disconnected
from server.harmony import HarmonyParser
from server.logprobs import chat_logprobs
from server.output_parser import OutputParser
from server.params import check_context, check_generation_request, default_max_tokens, sampling_params
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTemplateFields,
    DeltaMessage,
    ToolCall,
    Usage,
    model_dump,
    new_id,
)
from server.reasoning import NO_REASONING, effort_template_kwargs
from server.sse import sse_response
from server.state import Served, served
from server.tools import ToolPlan

router = APIRouter()


# Fields of OpenAI's chat API that ask for what tokenstep cannot do: a 400
# naming the field rather than an answer that silently lacks it.
UNSERVED_FIELDS = {
    "audio": "audio output is not supported: the served model writes text",
    "web_search_options": "web search is not supported: nothing runs searches here",
}


def _check_supported(body: ChatCompletionRequest, state: Served) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    extra = body.model_extra or {}
    for field, message in UNSERVED_FIELDS.items():
        if extra.get(field) is not None:
            raise InvalidRequestError(message, param=field)
    if extra.get("modalities") not in (None, ["text"]):
        raise InvalidRequestError('only "text" output is supported: the served model writes text', param="modalities")
    if not state.thinks:
        for field in ("reasoning_effort", "max_reasoning_tokens"):
            if getattr(body, field, None) is not None or extra.get(field) is not None:
                raise InvalidRequestError(f"{field} is not supported: {NO_REASONING}", param=field)


def with_effort(fields: ChatTemplateFields, effort: str | None) -> ChatTemplateFields:
    """The template options with a reasoning effort folded in (the request's own ``chat_template_kwargs`` win)."""
    if effort is None:
        return fields
    return fields.model_copy(update={"chat_template_kwargs": {**effort_template_kwargs(effort), **(fields.chat_template_kwargs or {})}})


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, raw_request: Request, state: Served = Depends(served)
) -> JSONResponse | EventSourceResponse:
    created = int(time.time())  # arrival: the same value in every chunk and in the JSON body
    _check_supported(body, state)
    check_generation_request(body, state)
    effort = (body.model_extra or {}).get("reasoning_effort")
    chat_prompt = build_chat_prompt(state, message_dicts(body.messages), with_effort(body, effort))
    prompt, plan = chat_prompt.token_ids, chat_prompt.plan
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens(len(prompt), state)
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    check_context(len(prompt), max_tokens, state, max_tokens_param, prompt_param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    thinking = state.thinking_spec(chat_prompt.opens_reasoning, body.max_reasoning_tokens)
    params = sampling_params(body, max_tokens, logprobs, plan=plan, thinking=thinking, keep_special_tokens=state.keeps_special_tokens)
    request_id = new_id("chatcmpl")
    raw_request.state.request_id = request_id
    choices = await start_choices(state, [prompt], params, body.n, request_id)
    settings = raw_request.app.state.settings
    outputs = merge(state, choices, raw_request.app.state.metrics, settings.request_timeout)
    reply = ReplyShape(state, request_id, created, len(prompt), plan, body.skip_special_tokens, chat_prompt.opens_reasoning)
    if body.stream:
        return sse_response(_stream(reply, outputs, body.include_usage, body.continuous_usage), settings)
    return JSONResponse(await unless_disconnected(raw_request, _collect(reply, outputs)))


def finish_reason(output: RequestOutput, calls: list[dict[str, Any]], plan: ToolPlan | None) -> str | None:
    """``tool_calls`` when calls were made and the output ended at a stop, or
    when ``max_tokens`` cut a forced output (``tool_choice`` required or a
    named function) after at least one complete call: the cut call is
    dropped, and what the client gets is a complete set of calls."""
    if calls and (output.finish_reason == "stop" or (output.finish_reason == "length" and plan is not None and plan.is_forced)):
        return "tool_calls"
    return output.finish_reason


@dataclass(frozen=True, slots=True)
class ReplyShape:
    """What every choice of one chat response shares: ids, arrival time, prompt size, tools."""

    state: Served
    request_id: str
    created: int
    prompt_tokens: int
    plan: ToolPlan | None
    skip_special_tokens: bool
    opens_reasoning: bool = False  # the prompt ends inside a thinking block

    def parser(self) -> OutputParser | HarmonyParser:
        """A fresh splitter of one choice's text into reasoning, content and calls."""
        return self.state.output_parser(self.plan, self.opens_reasoning)

    def reasoning_tokens(self, reasoning: str) -> int:
        """How many output tokens the reasoning took, counted by tokenizing its text."""
        return len(self.state.tokenizer(reasoning, add_special_tokens=False).input_ids) if reasoning else 0

    def logprobs(self, items: list[TokenLogprobs]) -> ChatChoiceLogprobs:
        return chat_logprobs(self.state.token_bytes, items, self.skip_special_tokens)

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.state.model_name, choices=choices, usage=usage
        ).to_json()


def _message(text: str, parser: OutputParser | HarmonyParser, has_reasoning: bool) -> AssistantMessage:
    """The whole choice (``parser`` has read it all after). Where calls or
    reasoning may be split out of the text, content left empty is None (as
    OpenAI and vLLM send it); a forced call cut short is shown as written."""
    split = parser.feed(text, is_last=True)
    reasoning = (parser.reasoning or None) if has_reasoning else None
    return AssistantMessage(
        content=(split.content or None) if parser.splits else split.content,
        tool_calls=[ToolCall(**call) for call in parser.calls or ([parser.cut_call] if parser.cut_call else [])] or None,
        reasoning_content=reasoning,
        reasoning=reasoning,
    )


async def _collect(reply: ReplyShape, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprobs]] = {}
    last: dict[int, RequestOutput] = {}
    want_logprobs = False
    async for index, output in outputs:
        texts.setdefault(index, []).append(output.new_text)
        logprobs.setdefault(index, []).extend(output.logprobs)
        want_logprobs = want_logprobs or bool(output.logprobs)
        last[index] = output
    has_reasoning = reply.state.thinks
    parsers = {index: reply.parser() for index in last}
    messages = {index: _message("".join(texts[index]), parsers[index], has_reasoning) for index in last}
    choices = [
        ChatChoice(
            index=index,
            message=messages[index],
            logprobs=reply.logprobs(logprobs[index]) if want_logprobs else None,
            finish_reason=finish_reason(output, parsers[index].calls, reply.plan),
            stop_reason=output.stop_reason,
        )
        for index, output in sorted(last.items())
    ]
    completion_tokens = sum(output.num_output_tokens for output in last.values())
    usage = Usage(
        prompt_tokens=reply.prompt_tokens, completion_tokens=completion_tokens, total_tokens=reply.prompt_tokens + completion_tokens
    )
    return model_dump(
        ChatCompletionResponse(id=reply.request_id, created=reply.created, model=reply.state.model_name, choices=choices, usage=usage)
    )


async def _stream(
    reply: ReplyShape, outputs: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool, continuous_usage: bool = False
) -> AsyncIterator[str]:
    """``continuous_usage``: every chunk after the role chunk also carries the usage so far."""
    started: set[int] = set()
    completion_tokens: dict[int, int] = {}
    parsers: dict[int, OutputParser | HarmonyParser] = {}

    def usage() -> Usage:
        total = sum(completion_tokens.values())
        return Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=total, total_tokens=reply.prompt_tokens + total)

    def usage_so_far() -> Usage | None:
        return usage() if continuous_usage else None

    try:
        async for index, output in outputs:
            if index not in started:
                started.add(index)
                parsers[index] = reply.parser()
                yield reply.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
            completion_tokens[index] = output.num_output_tokens
            logprobs = reply.logprobs(output.logprobs) if output.logprobs else None
            parser = parsers[index]
            split = parser.feed(output.new_text, output.is_finished)
            if split.reasoning:
                delta = DeltaMessage(reasoning_content=split.reasoning, reasoning=split.reasoning)
                yield reply.chunk([ChatChunkChoice(index=index, delta=delta)], usage_so_far())
            if split.content or logprobs:
                delta = DeltaMessage(content=split.content)
                yield reply.chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)], usage_so_far())
            calls = split.calls + ([parser.cut_call] if output.is_finished and parser.cut_call else [])
            if calls:
                first = len(parser.calls) - len(split.calls)
                fragments = [{"index": first + i, **call} for i, call in enumerate(calls)]
                yield reply.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(tool_calls=fragments))], usage_so_far())
            if output.is_finished:
                reason = finish_reason(output, parser.calls, reply.plan)
                yield reply.chunk(
                    [ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason, stop_reason=output.stop_reason)],
                    usage_so_far(),
                )
        if include_usage:
            yield reply.chunk([], usage())
        yield "[DONE]"
    finally:
        await outputs.aclose()
