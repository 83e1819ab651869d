"""``Sampler``: last-position logits in, one token id (and logprobs) per row out.

Data flow: the runner hands over ``logits`` (``[num_rows, vocab]``, on the
model's device, any float dtype) and one ``SamplingRow`` per row (the
request's ``SamplingParams``, its output length and, for penalties, its
``TokenCounts``, which the runner keeps across steps and brings up to date
with the new tokens only). Per-row parameters
become small ``[num_rows]`` tensors on the logits' device, every mask is a tensor
op over the whole batch, and only the chosen ids and logprobs come back as
Python ints and floats, so no tensor leaves ``model_runtime/``.

Order, as in vLLM, on a float32 copy of the logits:

1. ``min_tokens`` bans EOS and ``stop_token_ids`` while the output is too short
   (not for grammar-constrained rows: there the grammar says when text may end);
2. ``logit_bias`` is added;
3. repetition / frequency / presence penalties;
4. logprobs are read here: ``log_softmax`` of the *processed* logits (after 1-3,
   before temperature, top-k, top-p and min-p), i.e. vLLM's "processed logits
   without sampling transforms", so they do not change with temperature;
   a constrained row's logprobs are read before its grammar mask too (as
   vLLM's default), so they say how much the model itself wanted each token;
5. grammar-constrained rows: every token the grammar forbids gets -inf;
6. greedy rows (``temperature == 0``) take the argmax;
7. random rows: temperature, top-k, top-p, min-p, then the exponential race
   ``argmax(probs / q)``, ``q ~ Exp(1)``, which samples from ``probs`` without a
   cumulative sum. A seeded row draws ``q`` from its own generator seeded from
   ``(seed, num_output_tokens)``: its token depends neither on the other
   rows nor on earlier steps' RNG use, and no generator state is kept.
"""

from dataclasses import dataclass

import torch

from batching.messages import TokenLogprobs
from batching.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003  # mixes the request seed with the step index
_SEED_MASK = (1 << 63) - 1  # torch generator seeds must fit in a signed 64-bit int
# Cumulative float32 sums drift by ~1e-7; without slack, top_p=0.8 over
# probabilities [0.5, 0.3, ...] could keep a third token because 0.5 + 0.3
# rounds to 0.79999995.
_TOP_P_TOLERANCE = 1e-6


class TokenCounts:
    """One request's token statistics for the penalties, kept across steps:
    ``output_counts`` (``[vocab]`` float32, how often each token is in the
    output) and ``prompt_mask`` (``[vocab]`` bool, in the prompt).
    ``update`` adds only the output tokens appended since its last call, so a
    step costs the new tokens, not the output's length. Ids outside
    ``[0, vocab_size)`` are ignored."""

    def __init__(self, prompt_token_ids: list[int], vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # [vocab]
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [vocab]
        prompt_ids = self._in_vocab(prompt_token_ids)
        if prompt_ids is not None:
            self.prompt_mask[prompt_ids] = True
        self.num_counted = 0

    def update(self, output_token_ids: list[int]) -> "TokenCounts":
        """Count ``output_token_ids[num_counted:]`` (the list only ever grows)."""
        new_ids = self._in_vocab(output_token_ids[self.num_counted :])
        self.num_counted = len(output_token_ids)
        if new_ids is not None:
            self.output_counts.index_put_((new_ids,), torch.ones_like(new_ids, dtype=torch.float32), accumulate=True)
        return self

    def _in_vocab(self, token_ids: list[int]) -> torch.Tensor | None:
        kept = [t for t in token_ids if 0 <= t < self.vocab_size]
        return torch.tensor(kept, dtype=torch.long, device=self.output_counts.device) if kept else None  # [len(kept)]


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs about one request at this step.

    ``num_output_tokens`` drives min_tokens and the per-step seed;
    ``token_counts`` (required when the params have penalties) drives the
    repetition (prompt and output) and frequency/presence (output)
    penalties. ``eos_token_id`` is None when EOS must not be banned (no EOS,
    or the request ignores it).
    """

    sampling_params: SamplingParams
    num_output_tokens: int
    eos_token_id: int | None
    grammar_bitmask: bytes | None = None  # allowed next tokens (batching.messages.ScheduledChunk)
    token_counts: TokenCounts | None = None


def _needs_processing(row: SamplingRow) -> bool:
    params = row.sampling_params
    return (
        row.grammar_bitmask is not None
        or bool(params.logit_bias)
        or params.has_penalties
        or params.logprobs is not None
        or row.num_output_tokens < params.min_tokens
    )


def _row_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)  # [len(values)]


def _step_seed(seed: int, num_output_tokens: int) -> int:
    return (seed * _SEED_STRIDE + num_output_tokens) & _SEED_MASK


def _index_tensors(rows_and_ids: list[tuple[int, int]], num_columns: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row indices, column indices), dropping ids outside ``[0, num_columns)``."""
    pairs = [(row, token_id) for row, token_id in rows_and_ids if 0 <= token_id < num_columns]
    if not pairs:
        return None
    row_ids, token_ids = zip(*pairs)
    return (
        torch.tensor(row_ids, dtype=torch.long, device=device),  # [num_pairs]
        torch.tensor(token_ids, dtype=torch.long, device=device),  # [num_pairs]
    )


def _apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: -inf on EOS and stop tokens of rows still under min_tokens."""
    banned: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if row.grammar_bitmask is not None or row.num_output_tokens >= row.sampling_params.min_tokens:
            continue
        stop_ids = set(row.sampling_params.stop_token_ids)
        if row.eos_token_id is not None:
            stop_ids.add(row.eos_token_id)
        banned.extend((i, token_id) for token_id in stop_ids)
    index = _index_tensors(banned, logits.shape[1], logits.device)
    if index is not None:
        logits[index] = float("-inf")


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: add each row's ``logit_bias`` (ids beyond the columns ignored)."""
    entries = [
        (i, token_id, bias)
        for i, row in enumerate(rows)
        for token_id, bias in row.sampling_params.logit_bias.items()
        if 0 <= token_id < logits.shape[1]
    ]
    if not entries:
        return
    row_ids, token_ids, biases = zip(*entries)
    index = (
        torch.tensor(row_ids, dtype=torch.long, device=logits.device),  # [num_biases]
        torch.tensor(token_ids, dtype=torch.long, device=logits.device),  # [num_biases]
    )
    values = _row_tensor(list(biases), logits.device)  # [num_biases]
    logits.index_put_(index, values, accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: repetition penalty over prompt+output tokens, then frequency and
    presence penalties over output tokens only (vLLM semantics), on the
    penalized rows only."""
    penalized = [i for i, row in enumerate(rows) if row.sampling_params.has_penalties]
    if not penalized:
        return
    if any(rows[i].token_counts is None for i in penalized):
        raise ValueError("a row with penalties needs its token_counts")
    device = logits.device
    counts = torch.stack([rows[i].token_counts.output_counts for i in penalized])  # [P, vocab]
    is_output = counts > 0  # [P, vocab]
    is_seen = is_output | torch.stack([rows[i].token_counts.prompt_mask for i in penalized])  # [P, vocab]
    params = [rows[i].sampling_params for i in penalized]
    repetition = _row_tensor([p.repetition_penalty for p in params], device).unsqueeze(1)  # [P, 1]
    frequency = _row_tensor([p.frequency_penalty for p in params], device).unsqueeze(1)  # [P, 1]
    presence = _row_tensor([p.presence_penalty for p in params], device).unsqueeze(1)  # [P, 1]
    index = torch.tensor(penalized, dtype=torch.long, device=device)  # [P]
    selected = logits.index_select(0, index)  # [P, vocab]
    repeated = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(is_seen, repeated, selected)
    selected -= frequency * counts + presence * is_output
    logits.index_copy_(0, index, selected)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _apply_grammars(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: -inf on every token a constrained row's grammar forbids now.

    Each row's bitmask (bit ``t % 32`` of int32 word ``t // 32``, computed by
    the batching side) becomes one row of a CPU buffer; the bits are expanded
    on the logits' device.
    """
    constrained = [i for i, row in enumerate(rows) if row.grammar_bitmask is not None]
    if not constrained:
        return
    vocab = logits.shape[1]
    num_words = (vocab + 31) // 32
    row_bytes = num_words * 4
    masks = b"".join(rows[i].grammar_bitmask[:row_bytes].ljust(row_bytes, b"\0") for i in constrained)
    bitmask = torch.frombuffer(bytearray(masks), dtype=torch.int32).view(len(constrained), num_words)  # [num_constrained, num_words]
    device = logits.device
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)  # [32]
    bits = (bitmask.to(device).unsqueeze(-1) >> shifts) & 1  # [num_constrained, num_words, 32]
    allowed = bits.view(len(constrained), -1)[:, :vocab].bool()  # [num_constrained, vocab]
    if len(constrained) == len(rows):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.tensor(constrained, dtype=torch.long, device=device)  # [num_constrained]
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))


def _gather_logprobs(logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor) -> list[TokenLogprobs | None]:
    """log_softmax of the processed logits for rows that asked for logprobs.

    ``logits``: [num_rows, vocab] float32; ``token_ids``: [num_rows] chosen ids.
    """
    wanted = [i for i, row in enumerate(rows) if row.sampling_params.logprobs is not None]
    results: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return results
    index = torch.tensor(wanted, dtype=torch.long, device=logits.device)  # [num_wanted]
    logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)  # [num_wanted, vocab]
    chosen = logprobs.gather(1, token_ids.index_select(0, index).unsqueeze(1))  # [num_wanted, 1]
    max_top = min(max(rows[i].sampling_params.logprobs for i in wanted), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_top, dim=-1)  # [num_wanted, max_top] each
    chosen_list, top_values_list, top_ids_list = (
        chosen.squeeze(1).tolist(),
        top_values.tolist(),
        top_ids.tolist(),
    )
    chosen_ids = token_ids.index_select(0, index).tolist()
    for j, i in enumerate(wanted):
        num_top = rows[i].sampling_params.logprobs
        top = list(zip(top_ids_list[j][:num_top], top_values_list[j][:num_top]))
        results[i] = TokenLogprobs(token_id=chosen_ids[j], logprob=chosen_list[j], top=top)
    return results


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """In place: keep the ``top_k`` highest logits (ties at the k-th kept), then the
    smallest prefix of those whose renormalised mass reaches ``top_p``.

    ``logits``: [num_rows, vocab]; ``top_k``: [num_rows] (vocab = off);
    ``top_p``: [num_rows] (1.0 = off).
    """
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [num_rows, vocab]
    kth_logit = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [num_rows, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [num_rows, vocab]
    # Exclusive cumulative mass; a shifted cumsum stays monotone in float32.
    mass_before = torch.nn.functional.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))
    is_kept = mass_before < (top_p - _TOP_P_TOLERANCE).unsqueeze(1)  # [num_rows, vocab]
    is_kept |= (top_p >= 1.0).unsqueeze(1)
    is_kept[:, 0] = True
    is_kept &= sorted_logits > float("-inf")
    # Both masks keep a prefix of the sorted order, so one threshold per row
    # (the last kept logit) applies them in the original order.
    num_kept = is_kept.sum(dim=-1, keepdim=True)  # [num_rows, 1]
    threshold = sorted_logits.gather(1, num_kept - 1)  # [num_rows, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def _exponential_noise(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """``q ~ Exp(1)`` of ``probs``' shape; seeded rows from their own generator."""
    noise = torch.empty_like(probs)  # [num_rows, vocab]
    seeds = [row.sampling_params.seed for row in rows]
    if any(seed is None for seed in seeds):
        noise.exponential_()
    for i, (seed, row) in enumerate(zip(seeds, rows)):
        if seed is None:
            continue
        generator = torch.Generator(device=probs.device)
        generator.manual_seed(_step_seed(seed, row.num_output_tokens))
        noise[i].exponential_(generator=generator)
    return noise


def _argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (the first, on ties): [num_rows, vocab] -> [num_rows].

    ``max(dim).indices``, not ``argmax``: on CPU, argmax over a 49k vocab is a
    reduction 2-5x slower (docs/PERFORMANCE.md, "Measurements behind choices").
    """
    return values.max(dim=-1).indices


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, exponential race. Returns [num_rows] ids.

    ``logits``: [num_rows, vocab] float32, a copy this function may modify.
    """
    device, vocab = logits.device, logits.shape[1]
    params = [row.sampling_params for row in rows]
    temperature = _row_tensor([p.temperature for p in params], device)  # [num_rows]
    logits /= temperature.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k_values = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        top_k = torch.tensor(top_k_values, dtype=torch.long, device=device)  # [num_rows]
        top_p = _row_tensor([p.top_p for p in params], device)  # [num_rows]
        _apply_top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # [num_rows, vocab]
    if any(p.min_p > 0.0 for p in params):
        min_p = _row_tensor([p.min_p for p in params], device)  # [num_rows]
        max_prob = probs.max(dim=-1, keepdim=True).values  # [num_rows, 1]
        # The race is scale-invariant, so masked probs need no renormalising.
        probs.masked_fill_(probs < min_p.unsqueeze(1) * max_prob, 0.0)
    return _argmax(probs / _exponential_noise(probs, rows))  # [num_rows]


class Sampler:
    """Turns one step's last-position logits into one token per row.

    Stateless between calls (a request's ``TokenCounts`` are the runner's):
    seeded rows derive their randomness from ``(seed, num_output_tokens)``,
    unseeded rows use the default torch RNG.
    Columns at and beyond ``vocab_size`` (padding of the model's output
    embedding) are never sampled and never appear in logprobs.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax of each row over the real vocabulary: [n, vocab_columns] -> [n]."""
        return _argmax(logits[:, : self.vocab_size])

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, TokenLogprobs | None]]:
        """``logits``: [num_rows, vocab_columns], one row per entry of ``rows``.

        Returns ``(token_id, logprobs)`` per row; ``logprobs`` is None unless the
        row's ``sampling_params.logprobs`` is set. ``logits`` is not modified.
        """
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sampling rows")
        if not rows:
            return []
        logits = logits[:, : self.vocab_size]  # [num_rows, vocab], a view
        if all(r.sampling_params.is_greedy and not _needs_processing(r) for r in rows):
            return [(token_id, None) for token_id in _argmax(logits).tolist()]
        processed = logits.to(dtype=torch.float32, copy=True)  # [num_rows, vocab]
        _apply_min_tokens(processed, rows)
        _apply_logit_bias(processed, rows)
        _apply_penalties(processed, rows)
        wants_logprobs = any(row.sampling_params.logprobs is not None for row in rows)
        logprob_source = processed if wants_logprobs else None
        if wants_logprobs and any(row.grammar_bitmask is not None for row in rows):
            logprob_source = processed.clone()  # [num_rows, vocab], unmasked
        _apply_grammars(processed, rows)
        random_rows = [i for i, r in enumerate(rows) if not r.sampling_params.is_greedy]
        if len(random_rows) == len(rows) and logprob_source is not processed:
            token_ids = _sample_random(processed, rows)  # [num_rows]; nothing reads processed after
        else:
            token_ids = _argmax(processed)  # [num_rows]
            if random_rows:
                index = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
                sampled = _sample_random(processed.index_select(0, index), [rows[i] for i in random_rows])  # [num_random]
                token_ids.index_copy_(0, index, sampled)
        if logprob_source is None:
            return [(token_id, None) for token_id in token_ids.tolist()]
        logprobs = _gather_logprobs(logprob_source, rows, token_ids)
        return list(zip(token_ids.tolist(), logprobs))


def prompt_logprobs(logits: torch.Tensor, target_ids: list[int], num_top: int, vocab_size: int) -> list[TokenLogprobs]:
    """Logprobs of ``target_ids`` under raw ``logits`` ([n, vocab_columns]), one per row,
    each with the ``num_top`` best alternatives. No sampling transforms apply."""
    logprobs = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)  # [n, vocab]
    targets = torch.tensor(target_ids, dtype=torch.long, device=logits.device)  # [n]
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in target_ids]
    if num_top > 0:
        values, ids = logprobs.topk(num_top, dim=-1)  # [n, num_top] each
        top = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [TokenLogprobs(token_id, logprob, row_top) for token_id, logprob, row_top in zip(target_ids, chosen, top)]
