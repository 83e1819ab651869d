"""The thinking gate: the budget closes the block, the answer's constraint
starts after it, and without either nothing is constrained."""

from batching.thinking import ThinkingGate, ThinkingSpec, only_token_bitmask

VOCAB = 64
THINK, END = (10,), (11, 12)  # a one-token start tag, a two-token end tag


class OnlyEvens:
    """A stand-in answer constraint: even tokens, stopped after three."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def next_token_bitmask(self) -> bytes:
        return sum(1 << t for t in range(0, VOCAB, 2)).to_bytes(VOCAB // 8, "little")

    def accept(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return token_id % 2 == 0

    @property
    def is_stopped(self) -> bool:
        return len(self.accepted) >= 3

    @property
    def error(self) -> str | None:
        return None


def allowed(mask: bytes | None) -> set[int] | None:
    return None if mask is None else {t for t in range(VOCAB) if int.from_bytes(mask, "little") >> t & 1}


def test_the_budget_forces_the_end_tag_and_the_answer_is_free_after():
    gate = ThinkingGate(ThinkingSpec(THINK, END, is_open_at_start=True, max_thinking_tokens=3), None, VOCAB)
    for token in (1, 2, 3):
        assert gate.next_token_bitmask() is None and gate.accept(token)
    assert allowed(gate.next_token_bitmask()) == {11}
    gate.accept(11)
    assert allowed(gate.next_token_bitmask()) == {12}, "the rest of a tag is forced"
    gate.accept(12)
    assert gate.next_token_bitmask() is None and not gate.is_stopped and gate.num_thinking_tokens == 5


def test_a_block_the_model_closes_itself_ends_the_budget_and_a_half_written_tag_is_finished():
    gate = ThinkingGate(ThinkingSpec(THINK, END, is_open_at_start=True, max_thinking_tokens=10), None, VOCAB)
    for token in (5, 11, 12):
        gate.accept(token)
    assert gate.next_token_bitmask() is None and gate.num_thinking_tokens == 3
    gate = ThinkingGate(ThinkingSpec(THINK, END, is_open_at_start=True, max_thinking_tokens=2), None, VOCAB)
    gate.accept(5)
    gate.accept(11)
    assert allowed(gate.next_token_bitmask()) == {12}


def test_the_answer_constraint_starts_after_the_block():
    answer = OnlyEvens()
    gate = ThinkingGate(ThinkingSpec(THINK, END, is_open_at_start=False, max_thinking_tokens=2), answer, VOCAB)
    assert allowed(gate.next_token_bitmask()) == set(range(0, VOCAB, 2)) | {10}, "the answer's first token, or the tag"
    for token in (10, 3, 5):  # the tag, then two free (odd) thinking tokens
        assert gate.accept(token)
    assert allowed(gate.next_token_bitmask()) == {11}
    gate.accept(11)
    gate.accept(12)
    assert allowed(gate.next_token_bitmask()) == set(range(0, VOCAB, 2)) and answer.accepted == []
    for token in (2, 4, 6):
        assert gate.accept(token)
    assert gate.is_stopped


def test_without_a_block_the_constraint_applies_from_the_first_token():
    answer = OnlyEvens()
    gate = ThinkingGate(ThinkingSpec(THINK, END, is_open_at_start=False), answer, VOCAB)
    assert gate.accept(4) and answer.accepted == [4]
    assert allowed(gate.next_token_bitmask()) == set(range(0, VOCAB, 2))
    several = ThinkingGate(ThinkingSpec((20, 21), END, is_open_at_start=False), OnlyEvens(), VOCAB)
    assert allowed(several.next_token_bitmask()) == set(range(0, VOCAB, 2)), "a tag of several tokens: constrained output is all answer"
    free = ThinkingGate(ThinkingSpec((20, 21), END, is_open_at_start=False), None, VOCAB)
    assert free.accept(20) and free.accept(7) and free.next_token_bitmask() is None and free.num_thinking_tokens == 0


def test_one_token_bitmask_layout():
    assert allowed(only_token_bitmask(33, VOCAB)) == {33} and len(only_token_bitmask(33, 70)) == 12
