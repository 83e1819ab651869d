"""``server.tools`` without a model: tool validation, prompt conversion and the
incremental tool-call parser."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batching.errors import InvalidRequestError
from server.tool_formats import ToolCallParser
from server.tool_formats.base import TokenLiterals
from server.tool_formats.hermes import HermesFormat
from server.tools import plan_tools, template_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}

TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
    '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def hermes_parser(keep_partial: bool = True) -> ToolCallParser:
    return ToolCallParser(HermesFormat(TokenLiterals(None)), [], keep_partial)


def parse_in_pieces(text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    parser = hermes_parser()
    content, calls, start = "", [], 0
    for cut in sorted(cuts) + [len(text)]:
        piece_content, piece_calls = parser.feed(text[start:cut])
        content, calls, start = content + piece_content, calls + piece_calls, cut
    rest, last = parser.finish()
    return content + rest, calls + last


def strip_ids(calls: list[dict]) -> list[dict]:
    return [{key: value for key, value in call.items() if key != "id"} for call in calls]


def test_parser_splits_content_and_calls():
    content, calls = parse_in_pieces(TEXT, [])
    assert content == "Let me check."
    assert strip_ids(calls) == [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=12))
def test_any_split_of_the_stream_gives_the_same_result(cuts):
    whole_content, whole_calls = parse_in_pieces(TEXT, [])
    content, calls = parse_in_pieces(TEXT, cuts)
    assert content == whole_content
    assert strip_ids(calls) == strip_ids(whole_calls)


def test_partial_tag_is_held_back_and_released_when_it_is_not_a_tag():
    parser = hermes_parser()
    assert parser.feed("a <tool_") == ("a", [])
    assert parser.feed("box> b") == (" <tool_box> b", [])
    assert parser.finish() == ("", [])


def test_unparseable_or_unclosed_calls():
    assert parse_in_pieces("<tool_call>\nnot json\n</tool_call>", []) == ("<tool_call>\nnot json\n</tool_call>", [])
    content, calls = parse_in_pieces('<tool_call>\n{"name": "f", "arguments": {"x": 1}}', [])
    assert content == "" and strip_ids(calls) == [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    assert parse_in_pieces('<tool_call>\n{"name": ', []) == ('<tool_call>\n{"name":', []), "trailing whitespace is trimmed"
    assert parse_in_pieces("plain answer", [3]) == ("plain answer", [])


def test_plan_validates_tools_and_choice():
    assert plan_tools(None, None) is None
    assert plan_tools([WEATHER], None).choice == "auto"
    assert plan_tools([WEATHER], "none").parses_calls is False
    forced = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert forced.choice == "function" and forced.forced_name == "get_time"
    bad = [
        (None, "required", "tool_choice"),
        ([{"type": "retrieval"}], None, "tools.0"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools.0.function.name"),
        ([WEATHER, WEATHER], None, "tools"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
    ]
    for tools, choice, param in bad:
        with pytest.raises(InvalidRequestError) as caught:
            plan_tools(tools, choice)
        assert caught.value.param == param


def test_templates_without_tool_support_get_hermes_text():
    plan = plan_tools([WEATHER], "auto")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]
    converted, kwargs = template_messages(messages, plan, native=False)
    assert kwargs == {}
    assert converted[0]["role"] == "system" and "<tools>" in converted[0]["content"] and "get_weather" in converted[0]["content"]
    assert converted[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert converted[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}

    native, kwargs = template_messages(messages, plan, native=True)
    assert kwargs["tools"][0]["function"]["name"] == "get_weather"
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}, "templates get arguments as an object"
    assert native[2]["tool_call_id"] == "call_1"


def test_forced_grammars_compile_and_accept_a_call(tokenizer):
    from batching.structured import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    for choice, text in [
        (
            {"type": "function", "function": {"name": "get_weather"}},
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        ),
        (
            "required",
            '<tool_call>\n{"name": "get_time", "arguments": '
            '{}}\n</tool_call>\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome"}}\n</tool_call>',
        ),
    ]:
        matcher = compiler.matcher(plan_tools([WEATHER, TIME], choice).guided())
        assert all(matcher.accept(token) for token in tokenizer.encode(text, add_special_tokens=False)), text
        json.loads(text.split("\n")[1])
    wrong = compiler.matcher(plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}).guided())
    tokens = tokenizer.encode('<tool_call>\n{"name": "get_time"', add_special_tokens=False)
    assert not all(wrong.accept(token) for token in tokens), "a forced call must name the forced function"


def test_a_cut_off_forced_call_is_dropped_not_shown_as_content():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "f", "argu'
    parser = hermes_parser(keep_partial=False)
    content, calls = parser.feed(text)
    rest, last = parser.finish()
    assert content + rest == "" and len(calls + last) == 1
