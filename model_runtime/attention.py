"""Paged attention, plugged into transformers' ``AttentionInterface``.

The model's own forward runs over one flattened ragged batch ``[1, T]``. For
each layer, transformers hands us the step's new ``query``/``key``/``value``
(positions already applied); we write the new K/V into the paged cache by slot
index, then each sequence attends over its own blocks:

* decode sequences (one new token each) are batched: with tokenstep's kernels
  (float32 caches on the CPU), ``tokenstep::paged_decode_attention`` reads each
  sequence's keys and values straight from its blocks; otherwise their blocks
  are gathered into a padded ``[B, L]`` context with a length mask, one SDPA call;
* prefill chunks run one SDPA call each, causal over their new tokens and
  fully visible over the cached prefix.

The step's metadata travels in one ``StepContext`` passed through the
forward's kwargs (transformers forwards unknown kwargs down to attention).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from model_runtime import kernels
from model_runtime.kv_cache import CacheShape

ATTENTION_NAME = "tokenstep_paged"
CONTEXT_KWARG = "tokenstep_context"


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
    # All of the above as one int64 tensor (step_graph.pack) where the kernels
    # run: each layer is then one C++ op, tokenstep::paged_attention_step.
    metadata: torch.Tensor | None = None


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,  # [1, kv_heads, T, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention over the paged cache; returns ``[1, T, heads, head_dim]``.

    A compiled forward (``model_runtime.step_graph``) passes its own context,
    which routes this layer through one opaque op that ends in ``attend``."""
    context = kwargs[CONTEXT_KWARG]
    layer = module.layer_idx
    if not isinstance(context, StepContext):
        return context.attend(query, key, value, layer, scaling), None
    if context.metadata is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernels.load().paged_attention_step(query, key, value, context.key_caches[layer], context.value_caches[layer], context.metadata, scale), None
    return attend(query, key, value, context.key_caches[layer], context.value_caches[layer], context, scaling), None


def attend(
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,  # [1, kv_heads, T, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    context: StepContext,
    scaling: float | None,
) -> torch.Tensor:
    """Write this layer's new K/V, then attend: decode rows batched, each
    prefill chunk on its own. ``context``'s step metadata is used, not its
    caches. Returns ``[1, T, heads, head_dim]``."""
    write_cache(key_cache, value_cache, key[0], value[0], context.slot_mapping)
    if not context.prefills:  # decode rows only: the kernel's [B, heads, head_dim] is the output
        return _decode_attention(query[0], key_cache, value_cache, context, scaling).contiguous().unsqueeze(0)

    num_tokens, num_heads, head_dim = query.shape[2], query.shape[1], query.shape[3]
    output = query.new_empty(num_tokens, num_heads, head_dim)  # [T, heads, head_dim]
    if context.num_decode_tokens:
        output[: context.num_decode_tokens] = _decode_attention(query[0, :, : context.num_decode_tokens], key_cache, value_cache, context, scaling)
    for span in context.prefills:
        rows = slice(span.start, span.start + span.num_new_tokens)
        output[rows] = _prefill_attention(query[0, :, rows], key_cache, value_cache, span, scaling)
    return output.unsqueeze(0)


def write_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if key_cache.dtype == torch.float32 and key_cache.device.type == "cpu" and (ops := kernels.load()) is not None:
        ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    # key/value: [kv_heads, T, head_dim] -> [T, kv_heads, head_dim]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.transpose(0, 1))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.transpose(0, 1))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks of one or more sequences as ``[..., kv_heads, tokens, head_dim]``.

    ``index_select`` on the flattened block ids, not ``cache[block_ids]``:
    advanced indexing on CPU goes through a generic element-wise kernel, 3-4x
    slower than ``index_select``'s row copies (docs/PERFORMANCE.md,
    "Measurements behind choices").
    """
    gathered = cache.index_select(0, block_ids.reshape(-1)).view(*block_ids.shape, *cache.shape[1:])  # [..., n_blocks, block_size, kv_heads, head_dim]
    gathered = gathered.flatten(-4, -3)  # [..., tokens, kv_heads, head_dim]
    return gathered.transpose(-3, -2)


def _decode_attention(
    query: torch.Tensor,  # [heads, B, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    context: StepContext,
    scaling: float | None,
) -> torch.Tensor:
    if context.decode_context_mask is None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernels.load().paged_decode_attention(query.transpose(0, 1), key_cache, value_cache, context.decode_block_tables, context.decode_context_lens, scale)  # [B, heads, head_dim]
    keys = gather_blocks(key_cache, context.decode_block_tables)  # [B, kv_heads, L, head_dim]
    values = gather_blocks(value_cache, context.decode_block_tables)
    query = query.transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=context.decode_context_mask, scale=scaling, enable_gqa=_is_gqa(query, keys))
    return out.squeeze(2)  # [B, heads, head_dim]


def _prefill_attention(
    query: torch.Tensor,  # [heads, n, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    span: PrefillSpan,
    scaling: float | None,
) -> torch.Tensor:
    context_len = span.num_computed_tokens + span.num_new_tokens
    keys = gather_blocks(key_cache, span.block_ids)[:, :context_len]  # [kv_heads, ctx, head_dim]
    values = gather_blocks(value_cache, span.block_ids)[:, :context_len]
    keys, values = keys.unsqueeze(0), values.unsqueeze(0)  # [1, kv_heads, ctx, head_dim]
    query = query.unsqueeze(0)  # [1, heads, n, head_dim]
    gqa = _is_gqa(query, keys)
    if span.num_computed_tokens == 0:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        # Query i sits at position num_computed + i and sees keys up to it.
        positions = torch.arange(context_len, device=query.device)
        query_positions = positions[span.num_computed_tokens :, None]
        mask = positions[None, :] <= query_positions  # [n, ctx]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out[0].transpose(0, 1)  # [n, heads, head_dim]


def _is_gqa(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Grouped-query attention: SDPA broadcasts KV heads itself (no repeat copies)."""
    return query.shape[-3] != keys.shape[-3]


DECODE_KERNEL_LANES = 16  # the kernel takes head_dim a multiple of this, up to 256


def decode_kernel_runs(shape: CacheShape, device: torch.device) -> bool:
    """Whether decode attention runs in tokenstep's kernel (float32 caches on
    the CPU, a head_dim it takes, kernels built) rather than gather + SDPA."""
    head_dim_fits = shape.head_dim % DECODE_KERNEL_LANES == 0 and shape.head_dim <= 256
    return device.type == "cpu" and shape.dtype == torch.float32 and head_dim_fits and kernels.load() is not None


def decode_tables(block_tables: list[list[int]], context_lens: list[int], block_size: int, device: torch.device, with_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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


def register() -> str:
    """Register the backend with transformers; returns its implementation name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
