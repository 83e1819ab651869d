"""Cross-attention of an encoder-decoder model's decoder: each row of a step
reads its own source's K/V from the request's cross blocks (written once at
admission by ``EncoderDecoderStep.encode``), every source token visible."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_runtime import kernels
from model_runtime.attention.context import StepContext, decode_tables
from model_runtime.attention.interface import gather_blocks


@dataclass(slots=True)
class CrossContext:
    """Where each row of a step finds its source's K/V: decode rows batched
    (padded cross block tables and source lengths), then each prefill span
    of ``StepContext.prefills`` with its own cross blocks."""

    decode_block_tables: torch.Tensor | None  # [B, max_blocks] long
    decode_lens: torch.Tensor | None  # [B] long
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool; None where the kernel runs
    prefill_block_ids: list[torch.Tensor]
    prefill_lens: list[int]


def cross_attend(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, context: StepContext, cross: CrossContext, scale: float
) -> torch.Tensor:
    """Cross-attention of ``query`` ``[1, heads, T, head_dim]`` over each
    row's source (every source token is visible); returns ``[1, T, heads, head_dim]``."""
    num_tokens, num_heads, head_dim = query.shape[2], query.shape[1], query.shape[3]
    output = query.new_empty(num_tokens, num_heads, head_dim)
    num_decode = context.num_decode_tokens
    if num_decode:
        decode_query = query[0, :, :num_decode].transpose(0, 1)  # [B, heads, head_dim]
        if cross.decode_mask is None:
            output[:num_decode] = kernels.load().paged_decode_attention(
                decode_query, key_cache, value_cache, cross.decode_block_tables, cross.decode_lens, scale
            )
        else:
            keys = gather_blocks(key_cache, cross.decode_block_tables)  # [B, heads, L, head_dim]
            values = gather_blocks(value_cache, cross.decode_block_tables)
            out = F.scaled_dot_product_attention(decode_query.unsqueeze(2), keys, values, attn_mask=cross.decode_mask, scale=scale)
            output[:num_decode] = out.squeeze(2)
    for span, block_ids, source_len in zip(context.prefills, cross.prefill_block_ids, cross.prefill_lens):
        rows = slice(span.start, span.start + span.num_new_tokens)
        keys = gather_blocks(key_cache, block_ids)[:, :source_len].unsqueeze(0)  # [1, heads, S, head_dim]
        values = gather_blocks(value_cache, block_ids)[:, :source_len].unsqueeze(0)
        out = F.scaled_dot_product_attention(query[:, :, rows], keys, values, scale=scale)  # [1, heads, n, head_dim]
        output[rows] = out[0].transpose(0, 1)
    return output.unsqueeze(0)


def cross_context(
    tables: list[list[int]],
    lens: list[int],
    prefill_tables: list[list[int]],
    prefill_lens: list[int],
    block_size: int,
    device: torch.device,
    with_mask: bool,
) -> CrossContext:
    """The step's ``CrossContext`` from the decode rows' cross block tables
    and source lengths, then the prefill spans'."""
    decode_block_tables = decode_lens = decode_mask = None
    if tables:
        decode_block_tables, decode_lens, decode_mask = decode_tables(tables, lens, block_size, device, with_mask)
    prefill_blocks = [torch.tensor(blocks, dtype=torch.long, device=device) for blocks in prefill_tables]
    return CrossContext(decode_block_tables, decode_lens, decode_mask, prefill_blocks, list(prefill_lens))
