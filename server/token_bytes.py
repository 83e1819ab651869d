"""A token's real bytes, and where each token's text starts in the output.

``tokenizer.decode([token_id])`` cannot say what a token *is* when it holds
only part of a UTF-8 character (byte-level BPE splits an emoji over two or
three tokens): it returns U+FFFD. OpenAI's logprobs carry ``bytes`` so that a
client can join the tokens back into the exact text, and legacy completions
carry ``text_offset``. Both need the raw bytes, which this module recovers
from the vocabulary itself:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): each character of the
  vocabulary piece stands for one byte (GPT-2's printable byte alphabet);
- SentencePiece with byte fallback (Llama 2, Mistral): pieces ``<0xNN>`` are
  one byte, ``▁`` is a space;
- anything else (added tokens, WordPiece, ...): the UTF-8 of the decoded text.

A candidate from the first two rules is kept only when it agrees with the
tokenizer's own ``decode`` wherever that decode is a whole character string,
so an unknown vocabulary style degrades to the decoded text, never to wrong
bytes. Plain Python: ints, ``bytes`` and ``str``.
"""

import codecs
import re
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SENTENCEPIECE_SPACE = "\u2581"


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


_BYTE_OF_CHAR = _byte_alphabet()


class TokenBytes:
    """``token_id -> bytes`` for one tokenizer, computed once per id.

    ``special_ids`` are the ids a ``skip_special_tokens`` decode leaves out of
    the text; ``text_bytes`` gives them no bytes in that case (OpenAI's
    ``bytes: null``), so joining ``text_bytes`` rebuilds the text exactly.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes | None:
        """The bytes this token adds to the text (None: it adds nothing, being skipped)."""
        if skip_special_tokens and token_id in self.special_ids:
            return None
        return self(token_id)

    def token_text(self, token_id: int) -> str:
        """The token as a string: its text, with bytes that are not a whole
        character written as ``\\xNN`` (as OpenAI shows partial characters)."""
        return self(token_id).decode("utf-8", errors="backslashreplace")

    def _compute(self, token_id: int) -> bytes:
        decoded = self._tokenizer.decode([token_id], skip_special_tokens=False)
        if token_id in self._added:
            return decoded.encode("utf-8")
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        candidate = _piece_bytes(piece) if isinstance(piece, str) else None
        if candidate is not None and _agrees(candidate, decoded):
            return candidate
        return decoded.encode("utf-8")


def _piece_bytes(piece: str) -> bytes | None:
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    if piece and all(char in _BYTE_OF_CHAR for char in piece) and _SENTENCEPIECE_SPACE not in piece:
        return bytes(_BYTE_OF_CHAR[char] for char in piece)
    if piece:
        return piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")
    return None


def _agrees(candidate: bytes, decoded: str) -> bool:
    """Is ``candidate`` what the tokenizer decodes? Where the decode shows
    U+FFFD it cannot tell, so incomplete bytes are accepted there. A leading
    space is allowed to differ (SentencePiece drops it on a lone token)."""
    if REPLACEMENT_CHAR in decoded:
        return True
    text = candidate.decode("utf-8", errors="replace")
    if REPLACEMENT_CHAR in text:
        return False
    return text == decoded or text.lstrip(" ") == decoded.lstrip(" ")


class TextOffsets:
    """Character offsets of consecutive tokens in the text they decode to.

    ``next_offset(token_bytes)`` returns where this token's text starts: the
    number of whole characters the tokens before it produced. A token that
    starts in the middle of a character gets the offset of that character
    (the character counts from the token that starts it; the tokens that
    complete it share that offset).
    """

    def __init__(self, start: int = 0) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = start

    def next_offset(self, token_bytes: bytes | None) -> int:
        offset = self._offset
        if token_bytes:
            self._offset += len(self._decoder.decode(token_bytes))
        return offset
