"""IncrementalDetokenizer against the real SmolLM2 byte-level BPE tokenizer.

The reference is always ``tokenizer.decode(output_ids)``: the streamed pieces
plus ``flush()`` must add up to it, and no streamed piece may carry part of a
character (U+FFFD) that a later token completes.
"""

import random

import pytest
from transformers import PreTrainedTokenizerBase

from batching.detokenizer import CONTEXT_TOKENS, MAX_HELD_TOKENS, IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"  # spelled here, not imported: the tests check the module

TEXTS = [
    "Hello world, how are you?",
    " leading space and  two  spaces\tand a tab\nand a newline",
    "café naïve résumé, Ünïcödé: ß ø å",
    "Hello 😀 world",
    "你好世界，今天天气很好",
    "a 🤖🦾 b 👨‍👩‍👧 family, 日本語 and 한국어 🇫🇷",
]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chat_prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int], chunk: int = 1) -> list[str]:
    """All step() pieces for ``token_ids`` fed ``chunk`` at a time, then flush()."""
    pieces = [detokenizer.step(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)]
    return pieces + [detokenizer.flush()]


def is_split_across_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> bool:
    """True when some token holds only part of a character's UTF-8 bytes."""
    return any(REPLACEMENT_CHAR in tokenizer.decode([t]) for t in token_ids)


class CountingTokenizer:
    """Wraps a tokenizer and records the longest list it was asked to decode."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.max_decode_len = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.max_decode_len = max(self.max_decode_len, len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_add_up_to_full_decode(tokenizer: PreTrainedTokenizerBase, text: str, skip_special_tokens: bool) -> None:
    output_ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer, chat_prompt(tokenizer), skip_special_tokens)
    pieces = stream(detokenizer, output_ids)

    expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == expected
    assert detokenizer.output_text == expected
    assert pieces[-1] == ""  # complete text leaves nothing for flush()
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


@pytest.mark.parametrize("text", ["Hello 😀 world", "你好世界，今天天气很好", "a 🤖🦾 b"])
def test_split_character_arrives_whole(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    output_ids = encode(tokenizer, text)
    assert is_split_across_tokens(tokenizer, output_ids)  # else this test proves nothing
    pieces = stream(IncrementalDetokenizer(tokenizer, chat_prompt(tokenizer)), output_ids)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "".join(pieces) == text


def test_partial_emoji_is_held_until_completed(tokenizer: PreTrainedTokenizerBase) -> None:
    hello, emoji_start, emoji_end, world = encode(tokenizer, "Hello 😀 world")
    assert REPLACEMENT_CHAR in tokenizer.decode([emoji_start])
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Say:"))
    assert detokenizer.step([hello]) == "Hello"
    assert detokenizer.step([emoji_start]) == ""
    assert detokenizer.step([emoji_end]) == " 😀"
    assert detokenizer.step([world]) == " world"
    assert detokenizer.flush() == ""
    assert detokenizer.output_text == "Hello 😀 world"


@pytest.mark.parametrize("prompt", ["Say hello:", ""])
def test_first_token_keeps_its_leading_space(tokenizer: PreTrainedTokenizerBase, prompt: str) -> None:
    (world,) = encode(tokenizer, " world")
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt))
    assert detokenizer.step([world]) == " world"


def test_special_tokens_skipped_or_kept(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = encode(tokenizer, "Hi there") + [tokenizer.eos_token_id]
    prompt_ids = chat_prompt(tokenizer)
    skipped = stream(IncrementalDetokenizer(tokenizer, prompt_ids, True), output_ids)
    kept = stream(IncrementalDetokenizer(tokenizer, prompt_ids, False), output_ids)
    assert "".join(skipped) == "Hi there"
    assert "".join(kept) == "Hi there" + tokenizer.eos_token


def test_flush_drops_an_unfinished_character(tokenizer: PreTrainedTokenizerBase) -> None:
    """max_tokens cut the emoji: its first bytes never reach the text."""
    output_ids = encode(tokenizer, "Hi 😀")[:-1]  # the emoji's last byte never comes
    assert tokenizer.decode(output_ids).endswith(REPLACEMENT_CHAR)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    pieces = [detokenizer.step([t]) for t in output_ids]
    assert "".join(pieces) == "Hi"
    tail = detokenizer.flush()
    assert REPLACEMENT_CHAR not in tail
    assert "".join(pieces) + tail == tokenizer.decode(output_ids).rstrip(REPLACEMENT_CHAR)
    assert detokenizer.flush() == ""


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_multi_token_steps(tokenizer: PreTrainedTokenizerBase, chunk: int) -> None:
    output_ids = encode(tokenizer, " ".join(TEXTS))
    pieces = stream(IncrementalDetokenizer(tokenizer, chat_prompt(tokenizer)), output_ids, chunk)
    assert "".join(pieces) == tokenizer.decode(output_ids)


def test_decode_window_stays_small_on_long_output(tokenizer: PreTrainedTokenizerBase) -> None:
    output_ids = encode(tokenizer, " ".join(TEXTS) * 20)
    counting = CountingTokenizer(tokenizer)
    pieces = stream(IncrementalDetokenizer(counting, chat_prompt(tokenizer)), output_ids)
    assert len(output_ids) > 500
    assert "".join(pieces) == tokenizer.decode(output_ids)
    assert counting.max_decode_len <= CONTEXT_TOKENS + 4  # context + one unfinished char


def test_byte_garbage_keeps_window_bounded(tokenizer: PreTrainedTokenizerBase) -> None:
    """A run of lone UTF-8 continuation bytes never completes; it must not pile up."""
    continuation_byte = encode(tokenizer, "😀")[-1]
    assert tokenizer.decode([continuation_byte] * 3) == REPLACEMENT_CHAR * 3
    output_ids = [continuation_byte] * 200 + encode(tokenizer, " ok")
    counting = CountingTokenizer(tokenizer)
    pieces = stream(IncrementalDetokenizer(counting, []), output_ids)
    assert "".join(pieces) == tokenizer.decode(output_ids)
    assert counting.max_decode_len <= CONTEXT_TOKENS + MAX_HELD_TOKENS + 2
    assert len([p for p in pieces if p]) > 5  # released along the way, not only at the end


def test_random_token_sequences_match_full_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    """Random ids (many of them byte fragments) in random chunks still add up."""
    rng = random.Random(0)
    fragment_ids = [t for t in range(100, 400) if REPLACEMENT_CHAR in tokenizer.decode([t])]
    prompt_ids = chat_prompt(tokenizer)
    for _ in range(200):
        output_ids = [rng.choice(fragment_ids) if rng.random() < 0.5 else rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]
        skip_special_tokens = rng.random() < 0.5
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids[: rng.randint(0, len(prompt_ids))], skip_special_tokens)
        pieces = stream(detokenizer, output_ids, chunk=rng.randint(1, 3))
        expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
        text = "".join(pieces)
        # Only a trailing run of never-completed bytes may be missing.
        assert expected.startswith(text) and set(expected[len(text) :]) <= {REPLACEMENT_CHAR}, output_ids
        assert not pieces[-1].endswith(REPLACEMENT_CHAR), output_ids
