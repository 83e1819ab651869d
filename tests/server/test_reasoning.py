"""The reasoning parser: whatever way the text is cut into deltas, the same split."""

import pytest

from server.reasoning import ReasoningFormat, ReasoningParser, reasoning_format

THINK = ReasoningFormat()


def split(text: str, cuts: list[int], is_open_at_start: bool = False) -> tuple[str, str]:
    parser = ReasoningParser(THINK, is_open_at_start)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    reasoning, content = "", ""
    for position, piece in enumerate(pieces):
        r, c = parser.feed(piece, is_last=position == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    assert parser.reasoning == reasoning
    return reasoning, content


CASES = [
    ("<think>\nLet me see.\n\nIt is 4.\n</think>\n\nThe answer is 4.", False, ("Let me see.\n\nIt is 4.", "The answer is 4.")),
    ("The answer is 4.", False, ("", "The answer is 4.")),
    ("  plain <think>not at the start</think> text", False, ("", "  plain <think>not at the start</think> text")),
    ("Counting...\n</think>\n\n4", True, ("Counting...", "4")),
    ("still thinking when cut", True, ("still thinking when cut", "")),
    ("<think>cut inside the block </th", False, ("cut inside the block </th", "")),
    ("<think></think>answer", False, ("", "answer")),
    ("<thin", False, ("", "<thin")),
]


@pytest.mark.parametrize("text, is_open, expected", CASES)
def test_every_cut_gives_the_same_split(text, is_open, expected):
    assert split(text, [], is_open) == expected
    for cut in range(1, len(text)):
        assert split(text, [cut], is_open) == expected, cut
    assert split(text, list(range(1, len(text))), is_open) == expected, "one character a delta"


def test_the_format_comes_from_the_template_unless_named():
    qwen3_like = "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    assert reasoning_format("auto", qwen3_like) == THINK
    assert reasoning_format("auto", "{{ messages }}") is None and reasoning_format("auto", None) is None
    assert reasoning_format("none", qwen3_like) is None
    assert reasoning_format("deepseek_r1", None) == THINK
    assert THINK.is_open_at_end("<|im_start|>assistant\n<think>\n") and not THINK.is_open_at_end("assistant\n<think>\n\n</think>\n\n")
