"""Paged attention for CUDA, in Triton: one kernel launch per layer serves
the whole ragged step (decode rows and prefill chunks alike) straight from
the paged cache, and a second writes the step's new keys and values into it.

What it computes is what ``attention.interface.attend`` computes (the
reference the tests hold it to): each query at position p attends over its
own sequence's keys at positions k <= p (and k > p - window under a sliding
window), through the block table, with grouped-query heads, the layer's
scale, logit soft-capping (``softcap * tanh(s / softcap)``) and sinks (one
learned logit per head in every softmax's denominator, with no value). The
softmax runs online in float32 (flash attention's running max and sum); a
float32 cache is multiplied in full float32 precision ("ieee", not TF32), so
greedy outputs match ``generate`` on the same device.

How the work is split: a step's sequences are cut into tiles of
``block_q`` new tokens (1 for a decode-only step, 16 otherwise); each
program takes one tile and one KV head, i.e. ``block_q * group`` query rows
(the group's query heads share the KV head's loads), and walks that
sequence's visible keys ``BLOCK_N`` at a time, each key found through the
block table (so any block size works). The step's metadata
(``TritonStep``) is built once per step and read by every layer; its
tensors are all views of one int32 tensor, copied to the device at once.

Without a GPU, the same kernels run in Triton's interpreter (numpy, on CPU
tensors, under ``TRITON_INTERPRET=1``): that is how ``make test`` proves
them (tests/model_runtime/test_triton_attention.py; tests/conftest.py sets
the variable where CUDA is missing). Serving on the CPU never uses them.
Where Triton is missing, CUDA falls back to ``attend``.

Left out: splitting one long sequence's keys over several programs
(flash-decoding), which would help one stream with a long context on a GPU
with many more SMs than KV heads.
"""

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

BLOCK_N = 32  # keys per inner iteration
PREFILL_BLOCK_Q = 16  # new tokens per tile when a step has prefill chunks
MIN_BLOCK_M = 16  # tl.dot takes at least 16 rows


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def runs(device: torch.device) -> bool:
    """Whether a decoder's attention runs in these kernels: on CUDA, where
    Triton is installed."""
    return device.type == "cuda" and available()


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter, on CPU tensors
    (``TRITON_INTERPRET=1`` before Triton is first imported): how tests
    check them on machines without a GPU."""
    return available() and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True, slots=True)
class SequenceSpan:
    """One sequence of the step, in the flat batch's order: its new tokens
    are rows ``[query_start, query_start + num_new_tokens)`` at positions
    from ``num_computed_tokens`` on."""

    query_start: int
    num_new_tokens: int
    num_computed_tokens: int
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class TritonStep:
    """One step's metadata as the kernels read it; every tensor is int32 and
    a view of one buffer. Tile ``i`` is tokens ``[tile_offsets[i], +block_q)``
    of sequence ``tile_seqs[i]``'s new tokens."""

    seq_lens: torch.Tensor  # [S] tokens in context after this step
    query_starts: torch.Tensor  # [S] first row of the sequence in the flat batch
    query_lens: torch.Tensor  # [S] new tokens
    tile_seqs: torch.Tensor  # [N]
    tile_offsets: torch.Tensor  # [N]
    block_tables: torch.Tensor  # [S, W] padded with 0
    slot_mapping: torch.Tensor  # [T] cache slot of each new token; -1 writes nothing
    block_q: int

    @classmethod
    def build(cls, spans: list[SequenceSpan], slot_mapping: list[int], device: torch.device) -> "TritonStep":
        block_q = 1 if all(span.num_new_tokens == 1 for span in spans) else PREFILL_BLOCK_Q
        tiles = [(seq, offset) for seq, span in enumerate(spans) for offset in range(0, span.num_new_tokens, block_q)]
        width = max(len(span.block_ids) for span in spans)
        values = [span.num_computed_tokens + span.num_new_tokens for span in spans]
        values += [span.query_start for span in spans]
        values += [span.num_new_tokens for span in spans]
        values += [seq for seq, _ in tiles] + [offset for _, offset in tiles]
        values += [block for span in spans for block in span.block_ids + [0] * (width - len(span.block_ids))]
        values += slot_mapping
        buffer = torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)
        num_seqs, num_tiles = len(spans), len(tiles)
        parts = buffer.split([num_seqs] * 3 + [num_tiles] * 2 + [num_seqs * width, len(slot_mapping)])
        return cls(*parts[:5], parts[5].view(num_seqs, width), parts[6], block_q)


def write_cache(
    key: torch.Tensor,  # [kv_heads, T, head_dim]
    value: torch.Tensor,  # [kv_heads, T, value_head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int32; -1: a padded row, written nowhere
) -> None:
    """The step's new keys and values into their slots."""
    key, value = _rows_contiguous(key), _rows_contiguous(value)
    num_kv_heads, num_tokens, head_dim = key.shape
    value_head_dim = value.shape[-1]
    _kernels().write[(num_tokens, num_kv_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(1),
        value_cache.stride(2),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=value_head_dim,
        D_P2=_pow2(head_dim),
        DV_P2=_pow2(value_head_dim),
    )


def attention(
    query: torch.Tensor,  # [heads, T, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, value_head_dim]
    step: TritonStep,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,  # [heads]
) -> torch.Tensor:
    """``[T, heads, value_head_dim]``: every new token over its sequence's cache
    (which must already hold the step's own keys and values)."""
    query = _rows_contiguous(query)
    num_heads, num_tokens, head_dim = query.shape
    num_kv_heads, value_head_dim = key_cache.shape[2], value_cache.shape[3]
    group = num_heads // num_kv_heads
    output = query.new_empty(num_tokens, num_heads, value_head_dim)
    num_tiles = step.tile_seqs.shape[0]
    group_p2 = _pow2(group)
    _kernels().attend[(num_tiles, num_kv_heads)](
        output,
        query,
        key_cache,
        value_cache,
        step.block_tables,
        sinks if sinks is not None else query,  # not read without sinks
        step.seq_lens,
        step.query_starts,
        step.query_lens,
        step.tile_seqs,
        step.tile_offsets,
        scale,
        softcap or 0.0,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        step.block_tables.stride(0),
        key_cache.shape[1],
        HEAD_DIM=head_dim,
        HEAD_DIM_V=value_head_dim,
        D_P2=_pow2(head_dim),
        DV_P2=_pow2(value_head_dim),
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_Q=step.block_q,
        BLOCK_M=max(MIN_BLOCK_M, step.block_q * group_p2),
        BLOCK_N=BLOCK_N,
        HAS_SINKS=sinks is not None,
        HAS_SOFTCAP=bool(softcap),
        IEEE=query.dtype == torch.float32,
    )
    return output


def _rows_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels step through a head's elements one by one: the last dimension must be dense."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _pow2(n: int) -> int:
    """The smallest power of two >= max(n, 16) (tl.arange lengths, tl.dot sizes)."""
    return max(16, 1 << (n - 1).bit_length())


@dataclass(frozen=True, slots=True)
class _Kernels:
    write: object
    attend: object


@functools.cache
def _kernels() -> _Kernels:
    """The kernels, compiled for the GPU on first use (or interpreted, under
    ``TRITON_INTERPRET=1``, which Triton reads when it is first imported)."""
    import triton

    from model_runtime.attention import triton_kernels

    # Runtime values that may be 1 stay arguments: Triton would otherwise compile a variant for 1.
    dynamic = ("scale", "softcap", "window", "block_size")
    return _Kernels(triton.jit(triton_kernels.write_cache), triton.jit(triton_kernels.paged_attention, do_not_specialize=dynamic))
