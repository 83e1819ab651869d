"""A thinking model's block, watched token by token: a budget that closes it,
and an output constraint that applies to the answer after it.

``ThinkingGate`` stands where a ``GrammarMatcher`` stands on a request
(``next_token_bitmask``, ``accept``, ``is_stopped``, ``error``), so the
scheduler and the sampler treat it as any constraint. It follows the output:

* before: the output may open the block with its start tag (only as its
  first tokens); with an answer constraint, the first token is the
  constraint's or the tag's (a one-token tag only: a tag of several tokens
  could share its first with the constraint's text, so then the constrained
  output is all answer, as without a reasoning parser);
* inside: tokens are free (no constraint applies to thinking) and counted;
  the block ends when the model writes the end tag's tokens, or, once
  ``max_thinking_tokens`` are spent, by forcing the end tag;
* answer: the constraint (if any) applies from here, as if the output
  started here.

The tags are token ids (the tokenizer's encoding of ``<think>`` and
``</think>``: one token each in Qwen3's and DeepSeek-R1's vocabularies). A
model that spells the end tag in other tokens is not seen closing the block;
the budget still closes it.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ThinkingSpec:
    start_token_ids: tuple[int, ...]  # the opening tag (the model may write it first)
    end_token_ids: tuple[int, ...]  # the closing tag (forced when the budget is spent)
    is_open_at_start: bool  # the prompt opened the block: the output starts inside it
    max_thinking_tokens: int | None = None  # None: no budget


class Constraint(Protocol):
    """What a request's grammar offers the engine (``batching.structured.GrammarMatcher``)."""

    def next_token_bitmask(self) -> bytes: ...

    def accept(self, token_id: int) -> bool: ...

    @property
    def is_stopped(self) -> bool: ...

    @property
    def error(self) -> str | None: ...


class _Phase(Enum):
    BEFORE = "before"
    INSIDE = "inside"
    ANSWER = "answer"


def only_token_bitmask(token_id: int, vocab_size: int) -> bytes:
    """A bitmask (``GrammarMatcher``'s layout: bit ``t % 32`` of little-endian int32 word ``t // 32``) allowing one token."""
    return (1 << token_id).to_bytes(((vocab_size + 31) // 32) * 4, "little")


def _union(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(max(len(a), len(b)), "little")


class ThinkingGate:
    def __init__(self, spec: ThinkingSpec, answer_constraint: Constraint | None, vocab_size: int) -> None:
        self._spec = spec
        self._answer = answer_constraint
        self._vocab_size = vocab_size
        if spec.is_open_at_start:
            self._phase = _Phase.INSIDE
        elif answer_constraint is not None and len(spec.start_token_ids) > 1:
            self._phase = _Phase.ANSWER
        else:
            self._phase = _Phase.BEFORE
        self._start_matched = 0  # tokens of the start tag written so far (before)
        self._recent: list[int] = []  # the last tokens inside, to see the end tag
        self.num_thinking_tokens = 0

    def next_token_bitmask(self) -> bytes | None:
        """The allowed next tokens; None: any token."""
        start, end = self._spec.start_token_ids, self._spec.end_token_ids
        if self._phase is _Phase.BEFORE:
            if self._answer is None:
                return None  # the tag is only watched for
            return _union(self._answer.next_token_bitmask(), only_token_bitmask(start[0], self._vocab_size))
        if self._phase is _Phase.INSIDE:
            budget = self._spec.max_thinking_tokens
            if budget is None or self.num_thinking_tokens < budget:
                return None
            return only_token_bitmask(end[self._end_matched()], self._vocab_size)
        return self._answer.next_token_bitmask() if self._answer is not None else None

    def accept(self, token_id: int) -> bool:
        if self._phase is _Phase.BEFORE:
            return self._accept_before(token_id)
        if self._phase is _Phase.INSIDE:
            self.num_thinking_tokens += 1
            self._recent = (self._recent + [token_id])[-len(self._spec.end_token_ids) :]
            if self._recent == list(self._spec.end_token_ids):
                self._phase = _Phase.ANSWER
            return True
        return self._answer_accepts(token_id)

    @property
    def is_stopped(self) -> bool:
        return self._phase is _Phase.ANSWER and self._answer is not None and self._answer.is_stopped

    @property
    def error(self) -> str | None:
        return self._answer.error if self._answer is not None else None

    def _accept_before(self, token_id: int) -> bool:
        start = self._spec.start_token_ids
        if token_id == start[self._start_matched]:
            self._start_matched += 1
            if self._start_matched == len(start):
                self._phase = _Phase.INSIDE
            return True
        # Not a block (or, unconstrained, a tag the model did not finish): all answer from here.
        self._phase = _Phase.ANSWER
        return self._start_matched > 0 or self._answer_accepts(token_id)

    def _answer_accepts(self, token_id: int) -> bool:
        return self._answer.accept(token_id) if self._answer is not None else True

    def _end_matched(self) -> int:
        """How many of the end tag's tokens the output already ends with (to force the rest)."""
        end = self._spec.end_token_ids
        for length in range(min(len(end) - 1, len(self._recent)), 0, -1):
            if self._recent[-length:] == list(end[:length]):
                return length
        return 0
