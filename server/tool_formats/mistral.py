"""Mistral calls, after the ``[TOOL_CALLS]`` token, in either of its two forms:

* a JSON list (tokenizer v3, Mistral 7B v0.3, Mixtral, Nemo)::

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

* name and arguments apart (tokenizer v11 on: Mistral Small 3.2, Magistral,
  Devstral), one ``[TOOL_CALLS]`` per call::

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}

The calls run to the end of the answer. Which form a forced call takes is
the template's (``[ARGS]`` in it: the second). Call ids are 9 letters and
digits, the only ids Mistral's templates accept back.
"""

import json
import random
import string

from server.tool_formats.base import Call, Function, ToolFormat, grammar_schema, json_arguments_schema, json_object

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralFormat(ToolFormat):
    name = "mistral"
    open_tags = (TOOL_CALLS,)
    close_tag = None
    arguments_markers = ('"arguments":', ARGS)

    def __init__(self, literals, template: str = "") -> None:
        super().__init__(literals, template)
        self.names_apart = ARGS in template

    @classmethod
    def detects(cls, template: str) -> bool:
        return TOOL_CALLS in template

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        if body.lstrip().startswith("["):
            parsed = json_object(body)
            if not isinstance(parsed, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in parsed):
                return None
            return [(c["name"], c.get("arguments", {})) for c in parsed] or None
        calls = []
        for part in body.split(TOOL_CALLS):
            name, separator, arguments = part.partition(ARGS)
            parsed = json_object(arguments)
            if not separator or not name.strip() or parsed is None:
                return None
            calls.append((name.strip(), parsed))
        return calls

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        tool_calls = self.literals.literal(TOOL_CALLS)
        if not self.names_apart:
            calls = json_arguments_schema(functions, "name", "arguments")
            items = {k: v for k, v in calls.items() if k != "x-guidance"}
            schema = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
            return f"start: {tool_calls} %json {json.dumps(grammar_schema(schema))}"
        alternatives = " | ".join(
            f"{json.dumps(f.name)} {self.literals.literal(ARGS)} %json {json.dumps(grammar_schema(f.parameters))}" for f in functions
        )
        return f"start: call{'+' if parallel else ''}\ncall: {tool_calls} ({alternatives})"

    def new_call_id(self) -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))
