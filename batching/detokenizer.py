"""Incremental detokenization: sampled token ids in, final text pieces out.

The engine feeds each request's new output token ids to its
``IncrementalDetokenizer`` and gets back only the text that became final; that
text goes on to the request's ``StopStringMatcher`` (``batching.stop``) and then
to the client's stream. Everything here is CPU-side plain Python: lists of ints
and strings.

Decoding one token at a time is wrong in two ways, so we use the
prefix/read-offset technique of TGI and vLLM:

- A token's text depends on its neighbours (SentencePiece drops the leading
  space of the first token of a decode; byte-level BPE splits one character
  over several tokens). So we decode a small *window* that starts a few tokens
  before the unread ones (``prefix``) and emit what the window adds beyond the
  prefix's own text. The window starts inside the prompt, so the first output
  token's leading space is right.
- A window whose text ends in U+FFFD holds an incomplete UTF-8 sequence; its
  text is held back until a later token completes the character.

Per step we decode the window only, never the whole output: O(window), not
O(length).
"""

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

# Already-emitted tokens decoded as context before the unread ones (vLLM starts
# 5 tokens into the prompt): enough for SentencePiece's leading-space rule.
CONTEXT_TOKENS = 5

# A window still held after this many unread tokens holds bytes that are broken
# for good, not merely unfinished (no character needs more than 4 bytes, so 4
# tokens), or tokens that decode to nothing (skipped special tokens). Past it we
# release everything before the unfinished tail, so a model emitting byte
# garbage cannot make the window, and the cost of a step, grow without bound.
MAX_HELD_TOKENS = 16
# How many of the last token boundaries to try when releasing broken bytes.
MAX_BOUNDARY_TRIES = 4


class Tokenizer(Protocol):
    """The one tokenizer method we need (any Hugging Face tokenizer has it)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, piece by piece.

    Invariants: ``_window_ids`` holds the tokens from the prefix offset on;
    ``_window_ids[:_read_offset]`` is the already-emitted context whose text is
    ``_prefix_text``; the tokens after ``_read_offset`` are unread. The
    concatenation of every ``step()`` result and ``flush()`` equals
    ``tokenizer.decode(output_ids, skip_special_tokens=...)`` less a trailing
    incomplete character. No ``step()`` result holds part of a character
    that a later token completes: U+FFFD only stands for bytes broken for good.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window_ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._read_offset = len(self._window_ids)
        self._prefix_text = self._decode(self._window_ids)
        self._output_text = ""

    @property
    def output_text(self) -> str:
        """Everything emitted so far by ``step()`` and ``flush()``."""
        return self._output_text

    def step(self, new_token_ids: list[int]) -> str:
        """Append ``new_token_ids``; return the text that became final ("" if none)."""
        self._window_ids.extend(new_token_ids)
        window_text = self._decode(self._window_ids)
        is_unfinished = window_text.endswith(REPLACEMENT_CHAR)
        if not is_unfinished and len(window_text) > len(self._prefix_text):
            return self._emit(window_text, len(self._window_ids))
        if len(self._window_ids) - self._read_offset > MAX_HELD_TOKENS:
            return self._release_held(window_text)
        return ""

    def flush(self) -> str:
        """Return whatever is still held back, at the end of the output.

        Trailing bytes that never became a character (``max_tokens`` cut an
        emoji in half) are dropped, so the text never ends in U+FFFD; their
        tokens still count as output. U+FFFD stays only for bytes broken
        for good inside the text.
        """
        if len(self._window_ids) == self._read_offset:
            return ""
        window_text = self._decode(self._window_ids)
        window_text = window_text[: len(self._prefix_text)] + window_text[len(self._prefix_text) :].rstrip(REPLACEMENT_CHAR)
        if len(window_text) <= len(self._prefix_text):
            self._advance(len(self._window_ids))
            return ""
        return self._emit(window_text, len(self._window_ids))

    def _release_held(self, window_text: str) -> str:
        """Emit held text up to the last token boundary that no character straddles.

        A boundary is clean when decoding both sides separately gives the same
        text as decoding the window: then no byte after it can change the text
        before it. The unfinished tail stays held.
        """
        last_try = max(self._read_offset, len(self._window_ids) - 1 - MAX_BOUNDARY_TRIES)
        for boundary in range(len(self._window_ids) - 1, last_try, -1):
            head = self._decode(self._window_ids[:boundary])
            tail = self._decode(self._window_ids[boundary:])
            if head + tail == window_text and len(head) >= len(self._prefix_text):
                return self._emit(head, boundary)
        return ""

    def _emit(self, text: str, boundary: int) -> str:
        """Emit ``text`` beyond the prefix; the tokens up to ``boundary`` become read."""
        new_text = text[len(self._prefix_text) :]
        self._advance(boundary)
        self._output_text += new_text
        return new_text

    def _advance(self, boundary: int) -> None:
        """The last few read tokens become the next prefix; older tokens are dropped."""
        context_start = max(boundary - CONTEXT_TOKENS, 0)
        del self._window_ids[:context_start]
        self._read_offset = boundary - context_start
        self._prefix_text = self._decode(self._window_ids[: self._read_offset])

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
