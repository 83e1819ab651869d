"""Hermes calls (Qwen2.5, Qwen3, Hermes, and any model given the Hermes preamble)::

<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
"""

import json

from server.tool_formats.base import Call, Function, ToolFormat, json_arguments_schema, json_object


class HermesFormat(ToolFormat):
    name = "hermes"
    open_tags = ("<tool_call>",)
    close_tag = "</tool_call>"

    @classmethod
    def detects(cls, template: str) -> bool:
        return "<tool_call>" in template

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        parsed = json_object(body)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            return None
        return [(parsed["name"], parsed.get("arguments", parsed.get("parameters", {})))]

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        schema = json.dumps(json_arguments_schema(functions, "name", "arguments"))
        open_tag, close_tag = (self.literals.literal(tag) for tag in ("<tool_call>", "</tool_call>"))
        return f'{start}\ncall: {open_tag} "\\n" %json {schema} "\\n" {close_tag}'

    @staticmethod
    def text(name: str, arguments: object) -> str:
        """One call as a Hermes-trained model writes it (history for templates that do not render calls)."""
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
