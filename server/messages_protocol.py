"""Anthropic's Messages API request schema, and its request turned into the chat path's terms.

``POST /v1/messages`` reuses the chat path (``server.chat_prompt``): ``system``
becomes a system message; each message's content blocks become chat-shaped
message dicts (``text`` blocks content, assistant ``tool_use`` blocks
``tool_calls``, user ``tool_result`` blocks ``tool`` messages); ``tools``
(``name``, ``description``, ``input_schema``) become chat function tools and
``tool_choice`` (``auto``, ``any``, ``tool``, ``none``) the chat tool choice;
the sampling fields become ``SamplingFields``. A final assistant message is a
prefill: the model continues it (``continue_final_message``).

``output_config.format`` (a JSON schema) constrains the output as chat's
``response_format`` does. ``temperature``, ``top_p`` and ``top_k`` are read
though the newest SDKs no longer send them (older ones and other clients do).

Where the served model thinks (``server.reasoning``), ``thinking`` of type
``enabled`` or ``disabled`` is the template's ``enable_thinking`` switch and
``output_config.effort`` its ``reasoning_effort``; ``budget_tokens`` closes
the block after that many tokens (``batching.thinking``). Where it does
not, ``enabled`` and an effort are a 400; ``adaptive`` leaves it to the model.

What tokenstep cannot honour is a 400 naming the field: image, document and
other non-text blocks, server tools (web search, code execution, ...),
``mcp_servers``, ``container``.
``cache_control`` marks are accepted and have no effect: prefix caching is
automatic. Earlier turns' ``thinking`` blocks are dropped, as thinking
models' own templates drop them. Routing hints (``service_tier``, ``speed``,
``inference_geo``) are accepted and change nothing.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from batching.errors import InvalidRequestError
from server.protocol import MAX_STOP_STRINGS, ChatTemplateFields, JsonSchemaFormat, ResponseFormat, SamplingFields
from server.reasoning import NO_REASONING, effort_template_kwargs

MAX_METADATA_KEYS = 16
_DROPPED_BLOCKS = ("thinking", "redacted_thinking")


class MessagesRequest(BaseModel):
    """Anthropic's ``POST /v1/messages`` body (and ``/v1/messages/count_tokens``'s, less the sampling fields)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model name")
    messages: list[dict[str, Any]] = Field(..., min_length=1, description="user and assistant turns: a string or content blocks")
    system: str | list[dict[str, Any]] | None = Field(None, description="a string or a list of text blocks")
    max_tokens: int = Field(..., ge=1, description="the most output tokens")
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(None, description="client tools: [{'name', 'description', 'input_schema'}]")
    tool_choice: dict[str, Any] | None = Field(None, description="{'type': 'auto' | 'any' | 'tool' | 'none', 'name'?}")
    metadata: dict[str, Any] | None = Field(None, max_length=MAX_METADATA_KEYS)
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = Field(None, description="{'format': {'type': 'json_schema', 'schema': {...}}}")


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = Field(None, ge=1)


def check_supported(body: MessagesRequest, has_reasoning: bool) -> None:
    """400 for what the Messages API offers and tokenstep does not (``has_reasoning``: the served model thinks)."""
    extra = body.model_extra or {}
    unsupported = {
        "mcp_servers": "MCP servers are not supported: tokenstep runs no tools itself; send client tools",
        "container": "containers are not supported: tokenstep runs no code",
    }
    for field, message in unsupported.items():
        if extra.get(field):
            raise InvalidRequestError(message, param=field)
    thinking = (body.thinking or {}).get("type")
    if thinking not in (None, "disabled", "adaptive", "enabled"):
        raise InvalidRequestError(f"thinking type {thinking!r} is not supported (enabled, disabled, adaptive)", param="thinking.type")
    budget = (body.thinking or {}).get("budget_tokens")
    if thinking == "enabled" and budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise InvalidRequestError("budget_tokens is a positive integer", param="thinking.budget_tokens")
    if has_reasoning:
        return
    if thinking == "enabled":
        raise InvalidRequestError(f"thinking is not supported: {NO_REASONING}", param="thinking.type")
    if (body.output_config or {}).get("effort") is not None:
        raise InvalidRequestError(f"effort is not supported: {NO_REASONING}", param="output_config.effort")


def thinking_budget(body: MessagesRequest) -> int | None:
    """``thinking.budget_tokens`` where thinking is enabled: the block is closed after that many tokens."""
    thinking = body.thinking or {}
    return thinking.get("budget_tokens") if thinking.get("type") == "enabled" else None


def thinking_template_kwargs(body: MessagesRequest) -> dict[str, Any] | None:
    """``thinking`` and ``output_config.effort`` for the chat template: enabled or disabled
    is Qwen3's ``enable_thinking`` switch; an effort is chat's ``reasoning_effort``."""
    kwargs: dict[str, Any] = {}
    effort = (body.output_config or {}).get("effort")
    if effort is not None:
        kwargs.update(effort_template_kwargs(effort))
    thinking = (body.thinking or {}).get("type")
    if thinking in ("enabled", "disabled"):
        kwargs["enable_thinking"] = thinking == "enabled"
    return kwargs or None


def chat_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """``system`` + ``messages`` as chat-shaped message dicts (400 naming the block)."""
    messages = []
    if body.system:
        system = body.system if isinstance(body.system, str) else _text_of(body.system, "system")
        messages.append({"role": "system", "content": system})
    for position, message in enumerate(body.messages):
        param = f"messages.{position}"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            messages += _user_turn(message.get("content"), param)
        elif role == "assistant":
            messages.append(_assistant_turn(message.get("content"), param))
        else:
            raise InvalidRequestError("a message's role is user or assistant (system goes in the system field)", param=f"{param}.role")
    return messages


def ends_in_prefill(messages: list[dict[str, Any]]) -> bool:
    """A final assistant turn of text is a prefill the model continues."""
    return messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")


def template_fields(body: MessagesRequest, is_prefill: bool) -> ChatTemplateFields:
    """The request's tools, tool choice and prefill in the chat route's shape."""
    choice, parallel = chat_tool_choice(body.tool_choice)
    return ChatTemplateFields(
        tools=chat_tools(body.tools),
        tool_choice=choice,
        parallel_tool_calls=parallel,
        continue_final_message=is_prefill,
        chat_template_kwargs=thinking_template_kwargs(body),
    )


def sampling_fields(body: MessagesRequest) -> SamplingFields:
    return SamplingFields(
        model=body.model,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
        response_format=_response_format((body.output_config or {}).get("format")),
    )


def _response_format(output_format: Any) -> ResponseFormat | None:
    """``output_config.format`` as chat's ``response_format``."""
    if output_format is None:
        return None
    if (
        not isinstance(output_format, dict)
        or output_format.get("type") != "json_schema"
        or not isinstance(output_format.get("schema"), dict)
    ):
        raise InvalidRequestError("format is {'type': 'json_schema', 'schema': {...}}", param="output_config.format")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="output", schema=output_format["schema"]))


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    converted = []
    for position, tool in enumerate(tools):
        kind = tool.get("type", "custom") if isinstance(tool, dict) else None
        if kind != "custom":
            raise InvalidRequestError(
                f"tool type {kind!r} is not supported: only client tools ({{'name', 'description', 'input_schema'}}); "
                "server tools such as web search run nowhere here",
                param=f"tools.{position}.type",
            )
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description"):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(tool_choice: dict[str, Any] | None) -> tuple[str | dict[str, Any] | None, bool | None]:
    """Anthropic's ``tool_choice`` -> the chat tool choice and ``parallel_tool_calls``."""
    if tool_choice is None:
        return None, None
    kind, parallel = tool_choice.get("type"), not tool_choice.get("disable_parallel_tool_use", False)
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(tool_choice.get("name"), str):
        return {"type": "function", "function": {"name": tool_choice["name"]}}, parallel
    raise InvalidRequestError("tool_choice is {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}", param="tool_choice")


def _user_turn(content: Any, param: str) -> list[dict[str, Any]]:
    """Tool results first (as ``tool`` messages, in order), then the text as a user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results, texts = [], []
    for position, block in enumerate(_blocks(content, f"{param}.content")):
        block_param = f"{param}.content.{position}"
        kind = block.get("type")
        if kind == "tool_result":
            results.append(
                {"role": "tool", "tool_call_id": _string(block, "tool_use_id", block_param), "content": _result_text(block, block_param)}
            )
        elif kind == "text":
            texts.append(block.get("text") or "")
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported_block(kind, block_param)
    return results + ([{"role": "user", "content": "".join(texts)}] if texts or not results else [])


def _assistant_turn(content: Any, param: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for position, block in enumerate(_blocks(content, f"{param}.content")):
        block_param = f"{param}.content.{position}"
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") if isinstance(block.get("input"), dict) else {})
            calls.append(
                {
                    "id": _string(block, "id", block_param),
                    "type": "function",
                    "function": {"name": _string(block, "name", block_param), "arguments": arguments},
                }
            )
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported_block(kind, block_param)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _result_text(block: dict[str, Any], param: str) -> str:
    content = block.get("content")
    text = content if isinstance(content, str) else _text_of(content or [], f"{param}.content")
    return f"Error: {text}" if block.get("is_error") else text


def _text_of(blocks: Any, param: str) -> str:
    texts = []
    for position, block in enumerate(_blocks(blocks, param)):
        if block.get("type") != "text":
            raise _unsupported_block(block.get("type"), f"{param}.{position}")
        texts.append(block.get("text") or "")
    return "".join(texts)


def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise InvalidRequestError("content is a string or a list of content blocks", param=param)
    return content


def _string(block: dict[str, Any], name: str, param: str) -> str:
    value = block.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"a {block.get('type')} block needs {name} (a string)", param=f"{param}.{name}")
    return value


def _unsupported_block(kind: Any, param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"content block type {kind!r} is not supported: the served model reads text (text, tool_use and tool_result blocks)",
        param=f"{param}.type",
    )


def response_stop_reason(
    finish_reason: str | None, stop_reason: int | str | None
) -> Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]:
    """The chat path's finish reason as Anthropic's ``stop_reason``."""
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if isinstance(stop_reason, str) else "end_turn"
