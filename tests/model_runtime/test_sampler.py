"""``Sampler`` through its public API: hand-made logits and ``SamplingRow``s in,
token ids and logprobs out, checked against hand-computed values. No model."""

import math

import pytest
import torch

from batching.sampling_params import SamplingParams
from model_runtime.sampler import Sampler, SamplingRow, TokenCounts

VOCAB = 8


def make_row(
    output_token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
    eos_token_id: int | None = None,
    vocab_size: int = VOCAB,
    **params: object,
) -> SamplingRow:
    sampling_params = SamplingParams(**params)
    output_token_ids = output_token_ids or []
    counts = None
    if sampling_params.has_penalties:
        counts = TokenCounts(prompt_token_ids or [], vocab_size, torch.device("cpu")).update(output_token_ids)
    return SamplingRow(
        sampling_params=sampling_params,
        num_output_tokens=len(output_token_ids),
        eos_token_id=eos_token_id,
        token_counts=counts,
    )


def logits_from_probs(probs: list[float], num_rows: int = 1) -> torch.Tensor:
    return torch.tensor(probs).log().repeat(num_rows, 1)  # [num_rows, len(probs)]


def tokens_seen(probs: list[float], num_draws: int = 2000, **params: object) -> set[int]:
    """The set of tokens drawn from ``probs`` over many rows of one batch."""
    logits = logits_from_probs(probs, num_draws)
    rows = [make_row(**params) for _ in range(num_draws)]
    return {token_id for token_id, _ in Sampler(len(probs)).sample(logits, rows)}


def hand_log_softmax(values: list[float]) -> list[float]:
    finite = [v for v in values if v != -math.inf]
    log_total = math.log(sum(math.exp(v) for v in finite))
    return [v - log_total for v in values]


def test_greedy_is_argmax_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    tokens = Sampler(50).sample(logits, [make_row(temperature=0.0) for _ in range(5)])
    assert [t for t, _ in tokens] == logits.argmax(dim=-1).tolist()
    assert all(logprobs is None for _, logprobs in tokens)


def test_greedy_accepts_bfloat16_and_ignores_padding_columns() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 9.0], [2.0, 0.0, 1.0, 9.0]], dtype=torch.bfloat16)
    rows = [make_row(temperature=0.0), make_row(temperature=0.0, logprobs=2)]
    tokens = Sampler(vocab_size=3).sample(logits, rows)
    assert [t for t, _ in tokens] == [1, 0]
    assert all(token_id < 3 for token_id, _ in tokens[1][1].top)


def test_empty_batch() -> None:
    assert Sampler(VOCAB).sample(torch.empty(0, VOCAB), []) == []


def test_top_k_keeps_exactly_k_highest() -> None:
    probs = [0.1, 0.05, 0.3, 0.05, 0.2, 0.1, 0.15, 0.05]
    assert tokens_seen(probs, top_k=3) == {2, 4, 6}
    assert tokens_seen(probs, top_k=1) == {2}
    assert tokens_seen(probs, top_k=-1) == set(range(VOCAB))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.5, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1e-3, {0})],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, expected: set[int]) -> None:
    assert tokens_seen([0.5, 0.3, 0.15, 0.05], top_p=top_p) == expected


def test_top_p_maps_back_to_unsorted_ids_and_renormalises_after_top_k() -> None:
    probs = [0.05, 0.15, 0.5, 0.3]
    assert tokens_seen(probs, top_p=0.8) == {2, 3}
    # After top_k=3 the mass is [0.5, 0.3, 0.15] / 0.95: top 2 hold 0.842.
    assert tokens_seen(probs, top_k=3, top_p=0.84) == {2, 3}
    assert tokens_seen(probs, top_k=3, top_p=0.85) == {1, 2, 3}


@pytest.mark.parametrize(("min_p", "expected"), [(0.5, {0, 1}), (0.2, {0, 1, 2}), (1.0, {0})])
def test_min_p_drops_tokens_below_fraction_of_max(min_p: float, expected: set[int]) -> None:
    assert tokens_seen([0.5, 0.3, 0.15, 0.05], min_p=min_p) == expected


def test_sampling_follows_the_distribution() -> None:
    torch.manual_seed(1)
    logits = logits_from_probs([0.7, 0.2, 0.1], 4000)
    tokens = Sampler(3).sample(logits, [make_row() for _ in range(4000)])
    counts = torch.bincount(torch.tensor([t for t, _ in tokens]), minlength=3) / 4000
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_temperature_sharpens_the_distribution() -> None:
    torch.manual_seed(2)
    logits = logits_from_probs([0.6, 0.4], 4000)
    tokens = Sampler(2).sample(logits, [make_row(temperature=0.25) for _ in range(4000)])
    share_of_first = sum(t == 0 for t, _ in tokens) / 4000
    expected = 0.6**4 / (0.6**4 + 0.4**4)  # p ** (1 / T), renormalised
    assert abs(share_of_first - expected) < 0.03


def seeded_draw(seed: int, output_token_ids: list[int], others: int, position: int) -> int:
    """The token a seeded row gets at ``position`` in a batch of random rows."""
    vocab = 64
    generator = torch.Generator().manual_seed(123)
    logits = torch.randn(others + 1, vocab, generator=generator)  # [others + 1, vocab]
    target_logits = torch.linspace(0.0, 1.0, vocab)  # nearly flat: many possible tokens
    logits[position] = target_logits
    rows = [make_row(seed=None if i % 2 else 1000 + i) for i in range(others + 1)]
    rows[position] = make_row(output_token_ids=output_token_ids, seed=seed)
    return Sampler(vocab).sample(logits, rows)[position][0]


def test_seeded_row_is_independent_of_batch_and_stateless() -> None:
    for num_outputs in range(4):
        outputs = list(range(num_outputs))
        alone = seeded_draw(7, outputs, others=0, position=0)
        torch.manual_seed(num_outputs)  # the default RNG must not matter
        assert seeded_draw(7, outputs, others=2, position=1) == alone
        assert seeded_draw(7, outputs, others=5, position=5) == alone
        assert seeded_draw(7, outputs, others=5, position=0) == alone
        assert seeded_draw(7, outputs, others=0, position=0) == alone


def test_seeded_rows_vary_by_step_and_by_seed() -> None:
    draws_a = [seeded_draw(7, list(range(n)), others=0, position=0) for n in range(12)]
    draws_b = [seeded_draw(8, list(range(n)), others=0, position=0) for n in range(12)]
    assert draws_a != draws_b
    assert len(set(draws_a)) > 1


def test_penalties_change_logits_as_specified() -> None:
    raw = [1.0, -2.0, 0.5, 3.0, -1.0, 0.0, 2.0, -0.5]
    row = make_row(
        prompt_token_ids=[1, 2],
        output_token_ids=[2, 3, 3, 4],
        temperature=0.0,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logprobs=VOCAB,
    )
    expected = list(raw)
    for token_id in (1, 2, 3, 4):  # prompt + output: repetition penalty
        value = expected[token_id]
        expected[token_id] = value / 1.5 if value > 0 else value * 1.5
    for token_id, count in ((2, 1), (3, 2), (4, 1)):  # output only
        expected[token_id] -= 0.5 * count + 0.25
    token_id, logprobs = Sampler(VOCAB).sample(torch.tensor([raw]), [row])[0]
    assert token_id == max(range(VOCAB), key=expected.__getitem__)
    assert_logprobs_match(logprobs.top, hand_log_softmax(expected))


def assert_logprobs_match(top: list[tuple[int, float]], expected: list[float]) -> None:
    assert dict(top) == pytest.approx(dict(enumerate(expected)), abs=1e-5)


def test_logit_bias_adds_and_ignores_out_of_range_ids() -> None:
    raw = [0.5, 1.0, -1.0, 0.0]
    row = make_row(temperature=0.0, logit_bias={2: 5.0, 1: -2.0, 99: 100.0}, logprobs=4)
    token_id, logprobs = Sampler(4).sample(torch.tensor([raw]), [row])[0]
    assert token_id == 2
    assert_logprobs_match(logprobs.top, hand_log_softmax([0.5, -1.0, 4.0, 0.0]))


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 6.0]])  # eos 3 and stop 2 are the best
    params = {"min_tokens": 2, "stop_token_ids": (2,), "eos_token_id": 3, "logprobs": 4}
    sampler = Sampler(4)
    for temperature in (0.0, 1.0):
        short = make_row(output_token_ids=[1], temperature=temperature, **params)
        token_id, logprobs = sampler.sample(logits, [short])[0]
        assert token_id in (0, 1)
        assert dict(logprobs.top)[2] == -math.inf and dict(logprobs.top)[3] == -math.inf
    done = make_row(output_token_ids=[1, 1], temperature=0.0, **params)
    assert sampler.sample(logits, [done])[0][0] == 3


def test_min_tokens_without_eos_bans_only_stop_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 6.0]])
    row = make_row(min_tokens=1, stop_token_ids=(3,), temperature=0.0)
    assert Sampler(4).sample(logits, [row])[0][0] == 2


def test_logprobs_are_raw_log_softmax_sorted_and_sized() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 20)
    rows = [
        make_row(temperature=0.0, logprobs=5),
        make_row(temperature=0.3, top_k=4, logprobs=0),  # before temperature and top-k
        make_row(temperature=0.7, logprobs=None),
    ]
    results = Sampler(20).sample(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)  # [3, 20]
    for row_index, (token_id, logprobs) in enumerate(results[:2]):
        assert logprobs.token_id == token_id
        assert logprobs.logprob == pytest.approx(expected[row_index, token_id].item(), abs=1e-6)
    top = results[0][1].top
    assert len(top) == 5 and results[1][1].top == []
    assert [t for t, _ in top] == expected[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert all(isinstance(t, int) and isinstance(v, float) for t, v in top)
    assert results[2][1] is None


def test_input_logits_are_not_modified() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    before = logits.clone()
    row = make_row(output_token_ids=[3], vocab_size=4, repetition_penalty=2.0, logit_bias={0: 1.0}, top_k=2)
    Sampler(4).sample(logits, [row])
    assert torch.equal(logits, before)


def test_mismatched_rows_raise() -> None:
    with pytest.raises(ValueError):
        Sampler(VOCAB).sample(torch.zeros(2, VOCAB), [make_row()])


def test_token_counts_grow_with_only_the_new_tokens():
    """Counts brought up to date step by step equal counts built at once,
    and ids outside the vocabulary are ignored."""
    output = [3, 3, 1, 7, 3, 99, -1, 1]
    stepwise = TokenCounts([2, 2, 5, 42], VOCAB, torch.device("cpu"))
    for end in range(len(output) + 1):
        stepwise.update(output[:end])
    at_once = TokenCounts([2, 2, 5, 42], VOCAB, torch.device("cpu")).update(output)
    assert stepwise.output_counts.tolist() == at_once.output_counts.tolist() == [0, 2, 0, 3, 0, 0, 0, 1]
    assert stepwise.prompt_mask.tolist() == [False, False, True, False, False, True, False, False]
    assert stepwise.num_counted == len(output)


def test_penalties_touch_only_the_penalized_rows():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5]]).repeat(2, 1)  # [2, 4]
    counts = TokenCounts([0], 4, torch.device("cpu")).update([1, 1])
    plain = SamplingRow(SamplingParams(temperature=0.0, logprobs=0), 0, None)
    penalized = SamplingRow(
        SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=2.0, frequency_penalty=0.5), 2, None, token_counts=counts
    )
    (_, plain_lp), (_, penalized_lp) = Sampler(4).sample(logits, [plain, penalized])
    expected_plain = hand_log_softmax([1.0, -1.0, 2.0, 0.5])
    # token 0 (prompt): 1.0 / 2; token 1 (output twice): -1.0 * 2 - 0.5 * 2
    expected_penalized = hand_log_softmax([0.5, -3.0, 2.0, 0.5])
    assert plain_lp.logprob == pytest.approx(expected_plain[2], abs=1e-5)
    assert penalized_lp.logprob == pytest.approx(expected_penalized[2], abs=1e-5)


def test_a_penalized_row_without_counts_is_refused():
    row = SamplingRow(SamplingParams(presence_penalty=1.0), 0, None)
    with pytest.raises(ValueError, match="token_counts"):
        Sampler(4).sample(torch.zeros(1, 4), [row])
