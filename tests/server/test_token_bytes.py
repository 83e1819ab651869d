"""``TokenBytes`` recovers each token's real bytes (the real SmolLM2
byte-level vocabulary, and a SentencePiece-style one with byte fallback);
``TextOffsets`` places tokens in their text."""

import pytest
from transformers import PreTrainedTokenizerBase

from server.token_bytes import TextOffsets, TokenBytes

TEXTS = ["🌧☀️❄️ weather", "naïve café", "漢字とかな", "Привет, мир", "tabs\tand\nnewlines", "<|im_end|> is special"]


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_of_every_token_join_to_the_text(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert b"".join(token_bytes(token_id) for token_id in ids) == text.encode()


def test_whole_vocabulary_agrees_with_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoded with replacement, the bytes give exactly the tokenizer's decode,
    partial characters included (U+FFFD there, as the tokenizer shows them)."""
    token_bytes = TokenBytes(tokenizer)
    partial = 0
    for token_id in range(len(tokenizer)):
        decoded = tokenizer.decode([token_id], skip_special_tokens=False)
        raw = token_bytes(token_id)
        assert raw.decode("utf-8", errors="replace") == decoded, token_id
        partial += "\ufffd" in decoded
    assert partial > 100  # the byte tokens are there, and were checked


def test_partial_tokens_show_escapes_and_skipped_specials_have_no_bytes(tokenizer: PreTrainedTokenizerBase) -> None:
    token_bytes = TokenBytes(tokenizer)
    first, *_ = tokenizer("🌧", add_special_tokens=False).input_ids
    assert token_bytes.token_text(first) == "\\xf0\\x9f"
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes.text_bytes(eos) is None
    assert token_bytes.text_bytes(eos, skip_special_tokens=False) == b"<|im_end|>"


class SentencePieceLike:
    """Pieces as Llama 2's tokenizer has them: ``▁`` for spaces, ``<0xNN>`` byte fallback."""

    pieces = ["▁the", "<0xE2>", "<0x98>", "<0x80>", "é", "<s>"]

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        raw = b"".join(
            b"\xe2" if t == 1 else b"\x98" if t == 2 else b"\x80" if t == 3 else self.pieces[t].replace("▁", " ").encode()
            for t in token_ids
        )
        return raw.decode("utf-8", errors="replace").lstrip(" ")  # a lone piece loses its leading space


def test_sentencepiece_byte_fallback_and_spaces() -> None:
    token_bytes = TokenBytes(SentencePieceLike())
    assert [token_bytes(t) for t in range(5)] == [b" the", b"\xe2", b"\x98", b"\x80", "é".encode()]


def test_text_offsets_give_partial_tokens_their_character() -> None:
    offsets = TextOffsets()
    pieces = [b"a", b" \xf0\x9f", b"\x8c", b"\xa7", None, b"b"]  # None: a skipped special token
    assert [offsets.next_offset(piece) for piece in pieces] == [0, 1, 2, 2, 3, 3]
