"""gpt-oss's harmony output: channels split into reasoning, content and
calls however the stream cuts the text, and the forced call's grammar."""

import json

import pytest

from server.harmony import HarmonyParser
from server.tool_formats import Function, HarmonyFormat, tool_format_for
from server.tool_formats.base import TokenLiterals
from server.tools import plan_tools

WEATHER = Function("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
ANSWER = "<|channel|>analysis<|message|>Short question.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>"
CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
    '<|constrain|>json<|message|>{"city": "Paris"}'
)
PREAMBLE = "<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant<|channel|>final<|message|>Done."


def split(text: str, cuts: list[int], keep_partial: bool = True) -> tuple[str, str, list, HarmonyParser]:
    parser = HarmonyParser(HarmonyFormat(TokenLiterals(None)), [WEATHER], parses_calls=True, keep_partial=keep_partial)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    reasoning, content, calls = "", "", []
    for position, piece in enumerate(pieces):
        delta = parser.feed(piece, is_last=position == len(pieces) - 1)
        reasoning, content, calls = reasoning + delta.reasoning, content + delta.content, calls + delta.calls
    assert parser.reasoning == reasoning
    return reasoning, content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls], parser


@pytest.mark.parametrize(
    "text, expected",
    [
        (ANSWER, ("Short question.", "It is sunny.", [])),
        (CALL, ("Need the weather.", "", [("get_weather", {"city": "Paris"})])),
        (CALL + "<|call|>", ("Need the weather.", "", [("get_weather", {"city": "Paris"})])),
        (PREAMBLE, ("", "Let me look.Done.", [])),
        ("no channels at all", ("", "no channels at all", [])),
    ],
)
def test_every_cut_gives_the_same_split(text, expected):
    assert split(text, [])[:3] == expected
    for cut in range(1, len(text)):
        assert split(text, [cut])[:3] == expected, cut


def test_a_forced_call_cut_short_is_kept_as_written():
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Pa'
    *_, parser = split(text, [], keep_partial=False)
    assert parser.calls == [] and parser.cut_call["function"] == {"name": "get_weather", "arguments": '{"city": "Pa'}


def test_the_forced_grammar_writes_a_call_to_the_function(tokenizer):
    from batching.structured import GrammarCompiler

    tool_format = tool_format_for("auto", "{{ '<|start|>assistant<|channel|>final<|message|>' }}", tokenizer)
    assert tool_format.name == "harmony" and tool_format.needs_special_tokens
    compiler = GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}'
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        matcher = compiler.matcher(plan_tools([WEATHER.as_template_tool()], choice, tool_format=tool_format).guided())
        assert all(matcher.accept(token) for token in tokenizer.encode(text, add_special_tokens=False)) and matcher.is_stopped
