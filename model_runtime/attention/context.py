"""One step's attention metadata: where each new token's K/V goes and what
each sequence attends over.

``build_step`` turns the step's sequences (each a chunk of new tokens after
``num_computed_tokens`` cached ones, with its block table) into the flat
``input_ids`` / ``position_ids`` ``[1, T]`` the model's forward takes and the
``StepContext`` its attention reads: the slot mapping ``[T]``, padded block
tables and context lengths for the decode rows (one new token each, placed
first so attention can batch them) and a ``PrefillSpan`` per longer chunk.
The runner, the draft model and the load-time check
(``model_runtime.attention.check``) all build their steps here.
"""

import itertools
from dataclasses import dataclass

import torch

from model_runtime.attention.triton_paged import SequenceSpan, TritonStep


@dataclass(slots=True)
class PrefillSpan:
    """One prefill chunk: rows ``[start, start + num_new_tokens)`` of the batch."""

    start: int
    num_new_tokens: int
    num_computed_tokens: int
    block_ids: torch.Tensor  # [num_blocks_of_seq] long


@dataclass(slots=True)
class StepContext:
    """Everything attention needs for one step. Decode rows come first."""

    key_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, head_dim]
    value_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] long, padded with 0
    decode_context_lens: torch.Tensor | None  # [B] long
    decode_context_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool; None where the kernel runs
    prefills: list[PrefillSpan]
    # All of the above as one int64 tensor (attention.metadata.pack) where the kernels
    # run: each layer is then one C++ op, tokenstep::paged_attention_step.
    metadata: torch.Tensor | None = None
    # The same as the Triton kernels read it, where they run (CUDA: attention.triton_paged).
    triton: TritonStep | None = None


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One sequence's part of a step: ``token_ids`` at positions from
    ``num_computed_tokens`` on, its K/V in the blocks of ``block_ids``."""

    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]


def build_step(
    chunks: list[SequenceChunk],
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    device: torch.device,
    with_mask: bool,
    triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
    """The step's ``input_ids`` ``[1, T]``, ``position_ids`` ``[1, T]`` and
    ``StepContext``. ``chunks`` must list the decode rows (one token) first;
    ``with_mask`` builds their SDPA mask (not needed where the kernel runs);
    ``triton`` adds the metadata the Triton kernels read."""
    block_size = key_caches[0].shape[1]
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    prefills: list[PrefillSpan] = []
    decode_rows = [chunk for chunk in chunks if len(chunk.token_ids) == 1]
    assert all(len(chunk.token_ids) == 1 for chunk in chunks[: len(decode_rows)]), "decode rows come first"
    for chunk in chunks:
        start, num_new = chunk.num_computed_tokens, len(chunk.token_ids)
        if num_new != 1:
            prefills.append(PrefillSpan(len(token_ids), num_new, start, torch.tensor(chunk.block_ids, dtype=torch.long, device=device)))
        token_ids.extend(chunk.token_ids)
        positions.extend(range(start, start + num_new))
        slots.extend(chunk.block_ids[p // block_size] * block_size + p % block_size for p in range(start, start + num_new))
    tables = lens = mask = None
    if decode_rows:
        tables, lens, mask = decode_tables(
            [c.block_ids for c in decode_rows], [c.num_computed_tokens + 1 for c in decode_rows], block_size, device, with_mask
        )
    context = StepContext(
        key_caches=key_caches,
        value_caches=value_caches,
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=len(decode_rows),
        decode_block_tables=tables,
        decode_context_lens=lens,
        decode_context_mask=mask,
        prefills=prefills,
    )
    if triton:
        starts = [0, *itertools.accumulate(len(chunk.token_ids) for chunk in chunks)]
        spans = [SequenceSpan(start, len(c.token_ids), c.num_computed_tokens, c.block_ids) for start, c in zip(starts, chunks)]
        context.triton = TritonStep.build(spans, slots, device)
    input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)  # [1, T]
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # [1, T]
    return input_ids, position_ids, context


def decode_tables(
    block_tables: list[list[int]], context_lens: list[int], block_size: int, device: torch.device, with_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Padded block tables ``[B, max_blocks]``, context lengths ``[B]`` and,
    ``with_mask`` (for SDPA), the context mask ``[B, 1, 1, max_blocks *
    block_size]`` of a batch of decode rows."""
    max_blocks = max(len(block_ids) for block_ids in block_tables)
    padded = [block_ids + [0] * (max_blocks - len(block_ids)) for block_ids in block_tables]
    tables = torch.tensor(padded, dtype=torch.long, device=device)  # [B, max_blocks]
    lens = torch.tensor(context_lens, dtype=torch.long, device=device)  # [B]
    return tables, lens, context_mask(lens, max_blocks * block_size) if with_mask else None


def context_mask(context_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """SDPA's mask ``[B, 1, 1, max_len]`` over decode rows' padded contexts."""
    positions = torch.arange(max_len, device=context_lens.device)
    return (positions[None, :] < context_lens[:, None])[:, None, None, :]
