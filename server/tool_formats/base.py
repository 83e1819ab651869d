"""What every tool-call format shares: the function a call may name, the
format's interface, and how its tags become grammar literals.

A format says where calls start (``open_tags``) and end (``close_tag``, or
the end of the output), how a call's text becomes ``(name, arguments)``
pairs (``parse``), and the Lark grammar (llguidance's dialect) that forces
one or more calls (``grammar``). A tag that is one token of the model's
vocabulary is written in the grammar as that token (``<[id]>``), so a forced
call emits the token the model was trained on; a tag that is a special
token is also kept in the text the parser reads (``needs_special_tokens``).
"""

import json
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from batching.structured import JSON_WHITESPACE, closed_objects


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


class TokenLiterals:
    """Tags as grammar literals for one tokenizer (None: no tokenizer, every tag is text)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self._added: dict[str, tuple[int, bool]] = {}  # tag -> (token id, is special)
        for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            self._added[str(token)] = (token_id, bool(getattr(token, "special", False)))

    def literal(self, text: str) -> str:
        if text in self._added:
            return f"<[{self._added[text][0]}]>"
        return json.dumps(text)

    def is_special(self, text: str) -> bool:
        return self._added.get(text, (0, False))[1]


Call = tuple[str, Any]  # (function name, arguments: an object, or a string the model wrote)


class ToolFormat:
    """How one model family writes tool calls (subclasses fill the class attributes)."""

    name: ClassVar[str]
    open_tags: ClassVar[tuple[str, ...]]
    close_tag: ClassVar[str | None]  # None: the calls run to the end of the output
    only_at_start: ClassVar[bool] = False  # calls count only as the whole output (Llama 3's JSON)
    # What precedes a call's arguments, in order of preference (for a call cut short: ``cut_arguments``).
    arguments_markers: ClassVar[tuple[str, ...]] = ('"arguments":',)

    def __init__(self, literals: TokenLiterals, template: str = "") -> None:
        self.literals = literals

    @classmethod
    def detects(cls, template: str) -> bool:
        """This model's chat template writes or reads calls in this format."""
        raise NotImplementedError

    @property
    def needs_special_tokens(self) -> bool:
        """A tag is a special token: the text must keep special tokens for the parser to see it."""
        return any(self.literals.is_special(tag) for tag in (*self.open_tags, self.close_tag or ""))

    def parse(self, open_tag: str, body: str, functions: dict[str, Function]) -> list[Call] | None:
        """The calls in ``body`` (the text after ``open_tag``, up to the close tag); None if it is not calls."""
        raise NotImplementedError

    def grammar(self, functions: list[Function], parallel: bool) -> str:
        """Lark text whose ``start`` is one call of one of ``functions``, or several with ``parallel``."""
        raise NotImplementedError

    def cut_arguments(self, body: str) -> str:
        """The arguments a call cut short had written so far (not valid JSON; empty if none)."""
        for marker in self.arguments_markers:
            if marker in body:
                return body.split(marker, 1)[1].lstrip()
        return ""

    def new_call_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


def json_arguments_schema(functions: list[Function], name_key: str, arguments_key: str) -> dict[str, Any]:
    """The JSON schema of ``{name_key: <a function's name>, arguments_key: <its parameters>}`` for any of ``functions``."""
    calls = [
        {
            "type": "object",
            "properties": {name_key: {"const": f.name}, arguments_key: f.parameters},
            "required": [name_key, arguments_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return grammar_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema as the grammars embed it: objects closed, whitespace bounded (read at the top level only)."""
    return {**closed_objects(schema), "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}


def json_object(text: str) -> Any | None:
    try:
        return json.loads(text)
    except ValueError:
        return None
