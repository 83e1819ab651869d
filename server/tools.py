"""Tool calling on ``/v1/chat/completions``: tools into the prompt, calls out of the text.

Calls are written in the Hermes style, the one Qwen2.5, Hermes and many other
open models are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* Prompt: ``tools`` go to the chat template (``tools=`` of
  ``apply_chat_template``). A template that never mentions tools (SmolLM2's,
  for one) gets them in a Hermes-style system preamble instead, earlier
  assistant ``tool_calls`` as ``<tool_call>`` text and ``tool`` results as
  ``<tool_response>`` user turns, so any chat model can take part.
* ``tool_choice``: ``auto`` (default with tools) parses whatever calls the
  model writes; ``none`` parses nothing; ``required`` constrains the output to
  one or more calls of the given tools; a named function constrains it to
  exactly one call of that function. Constrained arguments follow each
  function's ``parameters`` schema token by token (``batching.structured``).
* Output: ``ToolCallParser`` turns text into content and calls, incrementally,
  so streaming emits ``delta.tool_calls`` (one fragment per call, with id,
  name and the whole arguments string) as soon as a call's closing tag
  arrives, and never leaks a partial ``<tool_call>`` tag as content.
"""

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from batching.errors import InvalidRequestError
from batching.structured import JSON_WHITESPACE, GuidedDecoding, closed_objects

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_template_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request's ``tools`` and ``tool_choice`` mean for this request."""

    functions: list[Function]
    choice: str  # "none", "auto", "required" or "function"
    forced_name: str | None = None
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def is_forced(self) -> bool:
        """The output is constrained to calls (``required`` or a named function)."""
        return self.choice in ("required", "function")

    def guided(self) -> GuidedDecoding | None:
        """The grammar for ``required`` or a named function; None otherwise."""
        if self.choice == "required":
            calls = [_call_schema(f) for f in self.functions]
            schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
            start = 'start: call ("\\n" call)*' if self.parallel else "start: call"
        elif self.choice == "function":
            schema = _call_schema(next(f for f in self.functions if f.name == self.forced_name))
            start = "start: call"
        else:
            return None
        schema = {**closed_objects(schema), "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}  # read at the top level only
        call = f"call: {json.dumps(OPEN_TAG + chr(10))} %json {json.dumps(schema)} {json.dumps(chr(10) + CLOSE_TAG)}"
        return GuidedDecoding.lark(f"{start}\n{call}", "tools", "tool call grammar")


def _call_schema(function: Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def plan_tools(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, parallel: bool | None = None
) -> ToolPlan | None:
    """Validate ``tools`` and ``tool_choice`` (400 naming the field); None without tools.

    ``parallel`` (``parallel_tool_calls``) False limits ``required`` to one call.
    """
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    functions = []
    for position, tool in enumerate(tools):
        param = f"tools.{position}"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': {...}}", param=param)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError("a function name is 1-64 letters, digits, '_' or '-'", param=f"{param}.function.name")
        parameters = function.get("parameters") or _EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise InvalidRequestError("parameters must be a JSON schema object", param=f"{param}.function.parameters")
        functions.append(Function(name, function.get("description"), parameters))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequestError("function names must be unique", param="tools")
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolPlan(functions, tool_choice or "auto", parallel=parallel is not False)
    forced = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or forced is None:
        raise InvalidRequestError(
            "tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}", param="tool_choice"
        )
    if forced not in names:
        raise InvalidRequestError(f"tool_choice names {forced!r}, which is not among the tools", param="tool_choice")
    return ToolPlan(functions, "function", forced)


def template_handles_tools(template: str) -> bool:
    return "tools" in template


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates expect the object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None, native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and extra template kwargs for a chat with tools.

    ``native``: the template renders ``tools``, assistant ``tool_calls`` and
    ``tool`` messages itself; otherwise they become Hermes-style text.
    """
    if native:
        converted = []
        for message in messages:
            if message.get("tool_calls"):
                message = {**message, "tool_calls": [_template_call(call) for call in message["tool_calls"]]}
            converted.append(message)
        kwargs = {"tools": [f.as_template_tool() for f in plan.functions]} if plan else {}
        return converted, kwargs
    converted = []
    for message in messages:
        if message["role"] == "tool":
            converted.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            calls = "\n".join(_hermes_text(call) for call in message["tool_calls"])
            text = f"{message['content']}\n{calls}" if message.get("content") else calls
            converted.append({"role": message["role"], "content": text})
        else:
            converted.append({key: value for key, value in message.items() if key in ("role", "content", "name")})
    if plan:
        preamble = _hermes_preamble(plan.functions)
        if converted and converted[0]["role"] == "system":
            converted[0] = {**converted[0], "content": f"{converted[0]['content']}\n\n{preamble}"}
        else:
            converted.insert(0, {"role": "system", "content": preamble})
    return converted, {}


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {**call, "function": {**function, "arguments": _arguments_object(function.get("arguments"))}}


def _hermes_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments"))}
    return f"{OPEN_TAG}\n{json.dumps(body)}\n{CLOSE_TAG}"


def _hermes_preamble(functions: list[Function]) -> str:
    signatures = "\n".join(json.dumps(f.as_template_tool()) for f in functions)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        f'{OPEN_TAG}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE_TAG}'
    )


def new_call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _parse_call(body: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    return new_call(parsed["name"], arguments)


def _partial_tag_suffix(text: str) -> int:
    """Length of the longest suffix of ``text`` that could start ``OPEN_TAG``."""
    for length in range(min(len(text), len(OPEN_TAG) - 1), 0, -1):
        if OPEN_TAG.startswith(text[-length:]):
            return length
    return 0


class ToolCallParser:
    """Splits one choice's text, delta by delta, into content and tool calls.

    ``feed`` returns ``(content, calls)`` ready to send; content never holds a
    (partial) tool-call tag, trailing whitespace (around calls, at the end) is
    dropped, and a call whose JSON does not parse stays content. ``finish``
    flushes the rest: a call the model did not close is still parsed if its
    JSON is complete; otherwise (output cut by max_tokens) it is content, or
    dropped when ``keep_partial`` is False (forced calls, where the text can
    only ever be calls).
    """

    def __init__(self, keep_partial: bool = True) -> None:
        self._keep_partial = keep_partial
        self._pending = ""
        self._in_call = False
        self._held_whitespace = ""
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._pending += text
        content, calls = "", []
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE_TAG)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE_TAG) :]
                self._in_call = False
                call = _parse_call(body)
                if call is None:
                    content += self._content(OPEN_TAG + body + CLOSE_TAG)
                else:
                    calls.append(call)
                    self._held_whitespace = ""
            else:
                start = self._pending.find(OPEN_TAG)
                if start < 0:
                    keep = _partial_tag_suffix(self._pending)
                    ready = self._pending[: len(self._pending) - keep]
                    self._pending = self._pending[len(ready) :]
                    content += self._content(ready)
                    break
                content += self._content(self._pending[:start])
                self._pending = self._pending[start + len(OPEN_TAG) :]
                self._in_call = True
        self.calls.extend(calls)
        return content, calls

    def feed_delta(self, text: str, is_last: bool) -> tuple[str, list[dict[str, Any]]]:
        """``feed`` one delta; with the last one, ``finish`` too (both results joined)."""
        content, calls = self.feed(text)
        if is_last:
            rest, last_calls = self.finish()
            content, calls = content + rest, calls + last_calls
        return content, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        rest, self._pending = self._pending, ""
        if self._in_call:
            self._in_call = False
            call = _parse_call(rest)
            if call is not None:
                self.calls.append(call)
                return "", [call]
            if not self._keep_partial:
                return "", []
            rest = OPEN_TAG + rest
        return self._content(rest), []

    def _content(self, text: str) -> str:
        """Trailing whitespace is held back until real content follows it, so
        whitespace around calls (and at the very end) never reaches the client,
        however the text was split into deltas."""
        text = self._held_whitespace + text
        ready = text.rstrip()
        self._held_whitespace = text[len(ready) :]
        return ready
