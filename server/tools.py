"""Tool calling on the chat routes: tools into the prompt, calls out of the text.

Each model family writes calls its own way (``server.tool_formats``: Hermes'
``<tool_call>`` JSON, Llama 3's bare JSON, Mistral's ``[TOOL_CALLS]``,
Qwen3-Coder's XML, DeepSeek's); the served model's format is picked once at
start from its chat template, or named by ``--tool-call-parser``.

* Prompt: ``tools`` go to the chat template (``tools=`` of
  ``apply_chat_template``), which renders them, earlier calls and tool
  results in the family's own way. A template that never mentions tools
  (SmolLM2's, for one) gets them in a Hermes-style system preamble instead,
  earlier assistant ``tool_calls`` as ``<tool_call>`` text and ``tool``
  results as ``<tool_response>`` user turns, so any chat model can take
  part; its calls are then read as Hermes calls.
* ``tool_choice``: ``auto`` (default with tools) parses whatever calls the
  model writes; ``none`` parses nothing; ``required`` constrains the output to
  one or more calls of the given tools; a named function constrains it to
  exactly one call of that function, in the format's own syntax. Constrained
  arguments follow each function's ``parameters`` schema token by token
  (``batching.structured``).
* Output: ``ToolCallParser`` turns text into content and calls, incrementally,
  so streaming emits ``delta.tool_calls`` (one fragment per call, with id,
  name and the whole arguments string: valid JSON, never a fragment) as soon
  as a call is complete, and never leaks a partial tag as content.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

from batching.errors import InvalidRequestError
from batching.structured import GuidedDecoding
from server.tool_formats import Function, ToolCallParser, ToolFormat
from server.tool_formats.base import TokenLiterals
from server.tool_formats.hermes import HermesFormat

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request's ``tools`` and ``tool_choice`` mean for this request."""

    functions: list[Function]
    choice: str  # "none", "auto", "required" or "function"
    tool_format: ToolFormat
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
        """The grammar for ``required`` or a named function, in the format's syntax; None otherwise."""
        if self.choice == "required":
            grammar = self.tool_format.grammar(self.functions, self.parallel)
        elif self.choice == "function":
            grammar = self.tool_format.grammar([f for f in self.functions if f.name == self.forced_name], parallel=False)
        else:
            return None
        return GuidedDecoding.lark(grammar, "tools", "tool call grammar")

    def parser(self) -> ToolCallParser:
        """A fresh splitter of one choice's text into content and calls (a forced output's cut call is dropped)."""
        functions = [f for f in self.functions if f.name == self.forced_name] if self.choice == "function" else self.functions
        return ToolCallParser(self.tool_format, functions, keep_partial=not self.is_forced)


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel: bool | None = None,
    tool_format: ToolFormat | None = None,
) -> ToolPlan | None:
    """Validate ``tools`` and ``tool_choice`` (400 naming the field); None without tools.

    ``parallel`` (``parallel_tool_calls``) False limits ``required`` to one
    call; ``tool_format``: how the model writes calls (default Hermes).
    """
    tool_format = tool_format or HermesFormat(TokenLiterals(None))
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
        return ToolPlan(functions, tool_choice or "auto", tool_format, parallel=parallel is not False)
    forced = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or forced is None:
        raise InvalidRequestError(
            "tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}", param="tool_choice"
        )
    if forced not in names:
        raise InvalidRequestError(f"tool_choice names {forced!r}, which is not among the tools", param="tool_choice")
    return ToolPlan(functions, "function", tool_format, forced)


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
    return HermesFormat.text(function.get("name"), _arguments_object(function.get("arguments")))


def _hermes_preamble(functions: list[Function]) -> str:
    signatures = "\n".join(json.dumps(f.as_template_tool()) for f in functions)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
