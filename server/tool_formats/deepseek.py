"""DeepSeek's calls (V3.1 and V3.2, and V3-0324 / R1-0528's older form)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The older form writes ``function<｜tool▁sep｜>get_weather`` and the
arguments in a fenced json block; both are read, and a forced call takes
the template's (a template that writes `````json`` gets the older form).
"""

import json
import re

from server.tool_formats.base import Call, Function, ToolFormat, grammar_schema, json_object

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEPARATOR = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + "(.*?)" + re.escape(CALL_END), re.DOTALL)
_FENCED = re.compile(r"\s*(\S+)\s*```(?:json)?\s*(.*?)\s*```\s*", re.DOTALL)


class DeepSeekFormat(ToolFormat):
    name = "deepseek"
    open_tags = (CALLS_BEGIN,)
    close_tag = CALLS_END
    arguments_markers = ("```json\n", SEPARATOR)

    def __init__(self, literals, template: str = "") -> None:
        super().__init__(literals, template)
        self.is_fenced = "```json" in template

    @classmethod
    def detects(cls, template: str) -> bool:
        return CALLS_BEGIN in template

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        calls = []
        for call in _CALL.findall(body):
            left, separator, right = call.partition(SEPARATOR)
            fenced = _FENCED.fullmatch(right) if left.strip() == "function" else None
            name, arguments = (fenced.group(1), json_object(fenced.group(2))) if fenced else (left.strip(), json_object(right))
            if not separator or not name or arguments is None:
                return None
            calls.append((name, arguments))
        return calls or None

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        literal = self.literals.literal
        alternatives = []
        for function in functions:
            schema = f"%json {json.dumps(grammar_schema(function.parameters))}"
            if self.is_fenced:
                alternatives.append(f'"function" {literal(SEPARATOR)} {json.dumps(function.name)} "\\n```json\\n" {schema} "\\n```"')
            else:
                alternatives.append(f"{json.dumps(function.name)} {literal(SEPARATOR)} {schema}")
        calls = "call+" if parallel else "call"
        return (
            f"start: {literal(CALLS_BEGIN)} {calls} {literal(CALLS_END)}\n"
            f"call: {literal(CALL_BEGIN)} ({' | '.join(alternatives)}) {literal(CALL_END)}"
        )
