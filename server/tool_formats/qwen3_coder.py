"""Qwen3-Coder's XML calls, one parameter a block, values as plain text::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A value is text where the parameter's schema says string (or says nothing),
else JSON (numbers, booleans, objects, arrays), read back by the schema.
A forced call writes the parameters in the schema's order, the required
ones always; a forced string value cannot contain ``<``.
"""

import json
import re
from typing import Any

from server.tool_formats.base import Call, Function, ToolFormat, grammar_schema

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


class Qwen3CoderFormat(ToolFormat):
    name = "qwen3_coder"
    open_tags = ("<tool_call>",)
    close_tag = "</tool_call>"
    arguments_markers = ()  # its arguments are not JSON: a cut call has none to show

    @classmethod
    def detects(cls, template: str) -> bool:
        return "<function=" in template and "<parameter=" in template

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        match = _FUNCTION.fullmatch(body.strip())
        if match is None:
            return None
        name = match.group(1).strip()
        properties = functions[name].parameters.get("properties", {}) if name in functions else {}
        arguments = {key.strip(): _value(value, properties.get(key.strip())) for key, value in _PARAMETER.findall(match.group(2))}
        return [(name, arguments)]

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        open_tag, close_tag = (self.literals.literal(tag) for tag in ("<tool_call>", "</tool_call>"))
        rules = [start, f'call: {open_tag} "\\n" ({" | ".join(f"fn{i}" for i in range(len(functions)))}) {close_tag}']
        for i, function in enumerate(functions):
            properties = function.parameters.get("properties", {})
            required = set(function.parameters.get("required", []))
            parts = []
            for j, (key, schema) in enumerate(properties.items()):
                rules.append(f'fn{i}_p{j}: {json.dumps(f"<parameter={key}>" + chr(10))} {_value_grammar(schema)} "</parameter>\\n"')
                parts.append(f"fn{i}_p{j}" + ("" if key in required else "?"))
            rules.append(f'fn{i}: {json.dumps(f"<function={function.name}>" + chr(10))} {" ".join(parts)} "</function>\\n"')
        return "\n".join(rules)


def _is_text(schema: Any) -> bool:
    return not isinstance(schema, dict) or schema.get("type") in (None, "string")


def _value(text: str, schema: Any) -> Any:
    if _is_text(schema):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _value_grammar(schema: Any) -> str:
    if not _is_text(schema):
        return f'%json {json.dumps(grammar_schema(schema))} "\\n"'
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list):
        return "(" + " | ".join(json.dumps(f"{value}\n") for value in schema["enum"]) + ")"
    # Text without "<", up to the newline before </parameter>, taken into the same
    # terminal: the lexer looks one byte ahead, so a value may hold newlines too.
    limit = schema.get("maxLength") if isinstance(schema, dict) else None
    return f"/[^<]{{0,{int(limit)}}}\\n/" if isinstance(limit, int) else "/[^<]*\\n/"
