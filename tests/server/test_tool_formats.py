"""Each model family's tool-call format: its text parsed into calls however
the stream cuts it, its forced-call grammar accepting exactly its syntax, and
the format picked from the chat template."""

import json

import pytest

from server.tool_formats import FORMATS, Function, HarmonyFormat, ToolCallParser, tool_format_for
from server.tool_formats.base import TokenLiterals
from server.tools import plan_tools

WEATHER = Function(
    "get_weather",
    "Weather now",
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]},
)
TIME = Function("get_time", None, {"type": "object", "properties": {}})
PARIS, TOKYO = ("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})

# What each family's models write (from their model cards and templates), and the calls in it.
EXAMPLES = {
    "hermes": [
        ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>', "Sure.", [PARIS]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', "", [PARIS]),
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; {"name": "get_time", "parameters": {}}',
            "",
            [PARIS, TOKYO],
        ),
        ("It is {sunny} today.", "It is {sunny} today.", []),
        ('{"name": "get_weather", "parameters": {"city": "Par', '{"name": "get_weather", "parameters": {"city": "Par', []),
    ],
    "mistral": [
        (
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "get_time", "arguments": {}}]',
            "",
            [PARIS, TOKYO],
        ),
        ('Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]get_time[ARGS]{}', "Checking.", [PARIS, TOKYO]),
    ],
    "qwen3_coder": [
        (
            "I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
            "I will look.",
            [PARIS, TOKYO],
        ),
    ],
    "deepseek": [
        (
            '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 2}<｜tool▁call▁end｜>'
            "<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            "",
            [PARIS, TOKYO],
        ),
        (
            "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"
            '\n```json\n{"city": "Paris", "days": 2}\n```'
            "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            "Let me check.",
            [PARIS],
        ),
    ],
}
TEMPLATES = {
    "hermes": "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>",
    "llama3_json": "{%- if tools %}<|python_tag|>{{ tools | tojson }}<|eom_id|>{% endif %}",
    "mistral": "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]",
    "qwen3_coder": "{%- if tools %}<tools>{% endif %}<tool_call>\n<function={{ name }}>\n<parameter={{ key }}>",
    "deepseek": "{%- if tools %}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ name }}<｜tool▁sep｜>{% endif %}",
}


def parse(format_name: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, object]]]:
    parser = ToolCallParser(tool_format_for(format_name, TEMPLATES[format_name], None), [WEATHER, TIME])
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    content, calls = "", []
    for position, piece in enumerate(pieces):
        c, found = parser.feed_delta(piece, is_last=position == len(pieces) - 1)
        content, calls = content + c, calls + found
    return content, [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls]


CASES = [(name, *example) for name, examples in EXAMPLES.items() for example in examples]


@pytest.mark.parametrize("format_name, text, content, calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_cut_of_a_familys_text_gives_its_calls(format_name, text, content, calls):
    assert parse(format_name, text, []) == (content, calls)
    for cut in range(1, len(text)):
        assert parse(format_name, text, [cut]) == (content, calls), cut
    assert parse(format_name, text, list(range(1, len(text)))) == (content, calls), "one character a delta"


@pytest.mark.parametrize("format_name", list(TEMPLATES))
def test_the_format_is_picked_from_the_template(format_name):
    assert tool_format_for("auto", TEMPLATES[format_name], None).name == format_name
    assert tool_format_for("auto", "{{ messages }}", None).name == "hermes"
    assert tool_format_for(format_name, "{{ messages }}", None).name == format_name


def forced_texts(format_name: str, names_apart: bool = False) -> list[tuple[object, str, list]]:
    """(tool_choice, the text a forced call writes, its calls) for each format."""
    one = {
        "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "mistral": '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'
        if names_apart
        else '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
        "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
        "deepseek": '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Oslo"}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    }[format_name]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    cases = [(forced, one, [("get_weather", {"city": "Oslo"})])]
    if format_name == "qwen3_coder":  # a text value over lines, and a JSON one
        text = (
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\nNorway\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
        )
        cases.append((forced, text, [("get_weather", {"city": "Oslo\nNorway", "days": 2})]))
    return cases


@pytest.mark.parametrize("format_name, names_apart", [(name, False) for name in TEMPLATES] + [("mistral", True)])
def test_the_forced_grammar_takes_the_formats_own_syntax(tokenizer, format_name, names_apart):
    from batching.structured import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    template = TEMPLATES[format_name] + ("[ARGS]" if names_apart else "")
    tool_format = tool_format_for(format_name, template, tokenizer)
    tools = [f.as_template_tool() for f in (WEATHER, TIME)]
    for choice, text, calls in forced_texts(format_name, names_apart):
        for tool_choice in (choice, "required"):
            matcher = compiler.matcher(plan_tools(tools, tool_choice, tool_format=tool_format).guided())
            tokens = tokenizer.encode(text, add_special_tokens=False)
            assert all(matcher.accept(token) for token in tokens), (tool_choice, text)
            parser = ToolCallParser(tool_format, [WEATHER, TIME])
            _, found = parser.feed_delta(text, is_last=True)
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] == calls
        wrong = compiler.matcher(plan_tools(tools, choice, tool_format=tool_format).guided())
        assert not all(wrong.accept(token) for token in tokenizer.encode(text.replace("get_weather", "get_time"), add_special_tokens=False))


def test_a_tag_that_is_one_token_is_forced_as_that_token(tokenizer):
    literals = TokenLiterals(tokenizer)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert literals.literal("<|im_start|>") == f"<[{im_start}]>" and literals.is_special("<|im_start|>")
    assert literals.literal("<tool_call>") == '"<tool_call>"' and not literals.is_special("<tool_call>")
    tagged = [f for f in FORMATS if f is not HarmonyFormat]  # harmony always reads special tokens
    assert all(not f(TokenLiterals(tokenizer), "").needs_special_tokens for f in tagged), "no tag is special in SmolLM2's vocabulary"


def test_mistral_call_ids_are_nine_letters_and_digits():
    parser = ToolCallParser(tool_format_for("mistral", "", None), [WEATHER])
    _, calls = parser.feed_delta('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', is_last=True)
    assert len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()


CUT_TEXTS = {
    "hermes": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', '{"city": "Par'),
    "llama3_json": ('{"name": "get_weather", "parameters": {"city": "Par', '{"city": "Par'),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par', '{"city": "Par'),
    "qwen3_coder": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", ""),
    "deepseek": ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Par', '{"city": "Par'),
}


@pytest.mark.parametrize("format_name", list(CUT_TEXTS))
def test_a_forced_call_cut_before_it_completed_is_kept_as_written_so_far(format_name):
    text, arguments = CUT_TEXTS[format_name]
    parser = ToolCallParser(tool_format_for(format_name, TEMPLATES[format_name], None), [WEATHER, TIME], keep_partial=False)
    assert parser.feed_delta(text, is_last=True) == ("", [])
    assert parser.calls == [] and parser.cut_call["function"] == {"name": "get_weather", "arguments": arguments}
    complete_first = ToolCallParser(tool_format_for("hermes", "", None), [WEATHER, TIME], keep_partial=False)
    complete_first.feed_delta(EXAMPLES["hermes"][0][0].removeprefix("Sure.\n") + "\n" + CUT_TEXTS["hermes"][0], is_last=True)
    assert len(complete_first.calls) == 1 and complete_first.cut_call is None, "after a complete call, the cut one is dropped"
