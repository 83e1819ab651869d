"""The Responses API's request schema, and its input turned into chat messages.

``POST /v1/responses`` reuses the chat path (``server.chat_prompt``): its
``input`` items become chat-shaped message dicts, its flat function tools
(``{"type": "function", "name", "parameters"}``) become chat tools
(``{"type": "function", "function": {...}}``), ``text.format`` becomes a
``response_format``. What tokenstep cannot honour is a 400 naming the field:
``background``, built-in tools (web search, file search, computer use, ...),
non-text content, ``truncation: auto``, ``conversation`` and stored prompts;
and, for a model without a reasoning parser, reasoning items and settings.
With one, ``reasoning.effort`` goes to the chat template (as chat's
``reasoning_effort``), and earlier turns' reasoning items are dropped (as
thinking models' templates drop them).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from batching.errors import InvalidRequestError
from server.protocol import MAX_REASONING_TOKENS_DESCRIPTION, ChatTemplateFields, JsonSchemaFormat, ResponseFormat, SamplingFields
from server.reasoning import NO_REASONING, effort_template_kwargs

TEXT_PART_TYPES = ("input_text", "output_text", "text")
MAX_METADATA_KEYS = 16


class TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (flat: name, schema, strict)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        return ResponseFormat(
            type="json_schema", json_schema=JsonSchemaFormat(name=self.name or "response", schema=self.schema_, strict=self.strict)
        )


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(SamplingFields):
    """OpenAI's ``POST /v1/responses`` body. The vLLM sampling extensions of
    the other routes (``top_k``, ``seed``, ``stop``, ...) are accepted too."""

    input: str | list[dict[str, Any]] = Field(
        ..., description="a string, or a list of message / function_call / function_call_output items"
    )
    instructions: str | None = Field(None, description="a system message for this turn only (not carried by previous_response_id)")
    max_output_tokens: int | None = Field(None, ge=1, description="omitted: the rest of the context window")
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, description="function tools: [{'type': 'function', 'name', 'description', 'parameters'}]"
    )
    tool_choice: str | dict[str, Any] | None = Field(None, description="'auto', 'none', 'required' or {'type': 'function', 'name': ...}")
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = Field(None, max_length=MAX_METADATA_KEYS)
    store: bool = True
    previous_response_id: str | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    max_reasoning_tokens: int | None = Field(None, ge=1, description=MAX_REASONING_TOKENS_DESCRIPTION)

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())


def check_supported(body: ResponsesRequest, has_reasoning: bool) -> None:
    """400 for what the Responses API offers and tokenstep does not (``has_reasoning``: the served model thinks)."""
    unsupported = {
        "background": "background responses are not supported; send stream: true or wait for the response",
        "conversation": "conversation objects are not supported; use previous_response_id",
        "prompt": "stored prompt templates are not supported; send input and instructions",
    }
    extra = body.model_extra or {}
    for field, message in unsupported.items():
        if body.background if field == "background" else extra.get(field):
            raise InvalidRequestError(message, param=field)
    settings = {key: value for key, value in (body.reasoning or {}).items() if value is not None}
    if body.max_reasoning_tokens is not None and not has_reasoning:
        raise InvalidRequestError(
            f"max_reasoning_tokens is not supported: {NO_REASONING}",
            param="max_reasoning_tokens",
        )
    if settings and not has_reasoning:
        raise InvalidRequestError(f"reasoning settings are not supported: {NO_REASONING}", param="reasoning")
    unserved = sorted(set(settings) - {"effort"})
    if unserved:
        raise InvalidRequestError(
            "only reasoning.effort is supported: the reasoning comes back as reasoning_text, never summarized",
            param=f"reasoning.{unserved[0]}",
        )
    if body.truncation == "auto":
        raise InvalidRequestError("truncation 'auto' is not supported: an input that does not fit is a 400", param="truncation")
    if body.n != 1:
        raise InvalidRequestError("the Responses API returns one output; n must be 1", param="n")


def template_fields(body: ResponsesRequest) -> ChatTemplateFields:
    """The request's tools, tool choice and reasoning effort in the chat route's shape."""
    effort = (body.reasoning or {}).get("effort")
    return ChatTemplateFields(
        tools=chat_tools(body.tools),
        tool_choice=chat_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        chat_template_kwargs=effort_template_kwargs(effort) if effort is not None else None,
    )


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    converted = []
    for position, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequestError(
                f"tool type {kind!r} is not supported: only function tools (built-in tools such as web search run nowhere here)",
                param=f"tools.{position}.type",
            )
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(tool_choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if tool_choice is None or isinstance(tool_choice, str):
        return tool_choice
    if tool_choice.get("type") == "function" and isinstance(tool_choice.get("name"), str):
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    raise InvalidRequestError("tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'name': ...}", param="tool_choice")


def input_messages(input_items: str | list[dict[str, Any]], has_reasoning: bool = False) -> list[dict[str, Any]]:
    """``input`` -> chat messages. Consecutive ``function_call`` items become
    the ``tool_calls`` of one assistant message; a ``function_call_output``
    becomes a ``tool`` message answering its ``call_id``; ``reasoning`` items
    are dropped where the model thinks (``has_reasoning``), else a 400."""
    if isinstance(input_items, str):
        return [{"role": "user", "content": input_items}]
    if not input_items:
        raise InvalidRequestError("input must not be empty", param="input")
    messages: list[dict[str, Any]] = []
    for position, item in enumerate(input_items):
        param = f"input.{position}"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = {
                "id": _text_field(item, "call_id", param),
                "type": "function",
                "function": {"name": _text_field(item, "name", param), "arguments": _text_field(item, "arguments", param)},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _content_text(output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", param), "content": content})
        elif kind == "reasoning" and has_reasoning:
            continue
        elif kind == "reasoning":
            raise InvalidRequestError("reasoning items are not supported: the served model does not produce them", param=f"{param}.type")
        else:
            raise InvalidRequestError(
                f"input item type {kind!r} is not supported (message, function_call, function_call_output)", param=f"{param}.type"
            )
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequestError("a message's role is user, assistant, system or developer", param=f"{param}.role")
    content = item.get("content")
    text = content if isinstance(content, str) else _content_text(content, f"{param}.content")
    return {"role": role, "content": text}


def _content_text(parts: Any, param: str) -> str:
    if not isinstance(parts, list):
        raise InvalidRequestError("content is a string or a list of text parts", param=param)
    texts = []
    for position, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_TYPES:
            raise InvalidRequestError(f"content part type {kind!r} is not supported (text only)", param=f"{param}.{position}.type")
        texts.append(part.get("text") or "")
    return "".join(texts)


def _text_field(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"a {item.get('type')} item needs {name} (a string)", param=f"{param}.{name}")
    return value
