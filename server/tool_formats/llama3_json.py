"""Llama 3.1 / 3.2 / 3.3 JSON calls: the whole answer is one or more JSON
objects (separated by ``;``), optionally after ``<|python_tag|>``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

The answer is calls only if it starts so; otherwise it is all content.
"""

import json

from server.tool_formats.base import Call, Function, ToolFormat, json_arguments_schema

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"
    open_tags = (PYTHON_TAG, "{")
    close_tag = None
    only_at_start = True
    arguments_markers = ('"parameters":', '"arguments":')

    @classmethod
    def detects(cls, template: str) -> bool:
        return PYTHON_TAG in template or "<|eom_id|>" in template

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        text = body if open_tag == PYTHON_TAG else "{" + body
        decoder, calls, position = json.JSONDecoder(), [], 0
        while True:
            position = _skip(text, position, " \t\n;")
            if position == len(text):
                return calls or None
            try:
                parsed, position = decoder.raw_decode(text, position)
            except ValueError:
                return None
            if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
                return None
            calls.append((parsed["name"], parsed.get("parameters", parsed.get("arguments", {}))))

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return f"{start}\ncall: %json {json.dumps(json_arguments_schema(functions, 'name', 'parameters'))}"


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position
