"""gpt-oss's harmony format: the answer, the thinking and the calls are
messages on channels, separated by special tokens::

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    ... or <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

``analysis`` is reasoning, ``final`` (and ``commentary`` to nobody, a
preamble) is content, and a message to ``functions.NAME`` is a call of NAME
with the message as its JSON arguments. ``server.harmony.HarmonyParser``
reads the text (special tokens kept: ``needs_special_tokens``); this class
says how a template shows the format and the grammar that forces a call.
"""

import json
import re

from server.tool_formats.base import Call, Function, ToolFormat, grammar_schema, json_object

CHANNEL, MESSAGE, CONSTRAIN, CALL = "<|channel|>", "<|message|>", "<|constrain|>", "<|call|>"
START, END, RETURN = "<|start|>", "<|end|>", "<|return|>"
MARKERS = (START, CHANNEL, MESSAGE, END, RETURN, CALL, CONSTRAIN)
_RECIPIENT = re.compile(r"to=functions\.([A-Za-z0-9_\-]+)")


class HarmonyFormat(ToolFormat):
    name = "harmony"
    open_tags = (CHANNEL,)
    close_tag = CALL

    @classmethod
    def detects(cls, template: str) -> bool:
        return CHANNEL in template and MESSAGE in template

    @property
    def needs_special_tokens(self) -> bool:
        """Always: every part of a harmony answer is told apart by special tokens."""
        return True

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        """One message (header and content) as a call, if it is addressed to a function."""
        header, separator, content = body.partition(MESSAGE)
        recipient = _RECIPIENT.search(header)
        arguments = json_object(content)
        if not separator or recipient is None or arguments is None:
            return None
        return [(recipient.group(1), arguments)]

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        literal = self.literals.literal
        alternatives = " | ".join(
            f'{json.dumps(f.name)} " " {literal(CONSTRAIN)} "json" {literal(MESSAGE)} %json {json.dumps(grammar_schema(f.parameters))}'
            for f in functions
        )
        # One call: the model's <|call|> (a stop token) ends the output after it.
        return f'start: {literal(CHANNEL)} "commentary to=functions." ({alternatives})'
