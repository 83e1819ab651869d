"""The Triton kernels behind ``attention.triton_paged`` (which documents
them), written as plain functions: ``triton_paged`` makes them kernels with
``triton.jit`` on a GPU, or hands them to Triton's interpreter on the CPU.
Importing this module needs Triton; importing ``triton_paged`` does not."""

import triton.language as tl


def write_cache(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slots_ptr,
    stride_key_head,
    stride_key_token,
    stride_value_head,
    stride_value_token,
    stride_key_cache_slot,
    stride_key_cache_head,
    stride_value_cache_slot,
    stride_value_cache_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    D_P2: tl.constexpr,
    DV_P2: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, D_P2)
        key = tl.load(key_ptr + head * stride_key_head + token * stride_key_token + d, mask=d < HEAD_DIM)
        tl.store(key_cache_ptr + slot * stride_key_cache_slot + head * stride_key_cache_head + d, key, mask=d < HEAD_DIM)
        dv = tl.arange(0, DV_P2)
        value = tl.load(value_ptr + head * stride_value_head + token * stride_value_token + dv, mask=dv < HEAD_DIM_V)
        tl.store(value_cache_ptr + slot * stride_value_cache_slot + head * stride_value_cache_head + dv, value, mask=dv < HEAD_DIM_V)


def paged_attention(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    tables_ptr,
    sinks_ptr,
    seq_lens_ptr,
    query_starts_ptr,
    query_lens_ptr,
    tile_seqs_ptr,
    tile_offsets_ptr,
    scale,
    softcap,
    window,
    stride_query_head,
    stride_query_token,
    stride_out_token,
    stride_out_head,
    stride_key_block,
    stride_key_slot,
    stride_key_head,
    stride_value_block,
    stride_value_slot,
    stride_value_head,
    stride_table,
    block_size,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    D_P2: tl.constexpr,
    DV_P2: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile)
    first_token = tl.load(tile_offsets_ptr + tile)
    seq_len = tl.load(seq_lens_ptr + seq)
    query_start = tl.load(query_starts_ptr + seq)
    query_len = tl.load(query_lens_ptr + seq)
    num_computed = seq_len - query_len

    # Row m of the tile: new token first_token + m // GROUP_P2, query head kv_head * GROUP + m % GROUP_P2.
    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP_P2
    head = kv_head * GROUP + rows % GROUP_P2
    row_valid = (rows // GROUP_P2 < BLOCK_Q) & (token < query_len) & (rows % GROUP_P2 < GROUP)
    position = num_computed + token  # [BLOCK_M]
    d = tl.arange(0, D_P2)
    dv = tl.arange(0, DV_P2)
    query_rows = (query_start + token).to(tl.int64)
    query = tl.load(
        query_ptr + query_rows[:, None] * stride_query_token + head[:, None] * stride_query_head + d[None, :],
        mask=row_valid[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )  # [BLOCK_M, D_P2]

    if HAS_SINKS:  # the sink is the softmax's first logit, with a value of zero
        running_max = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32)
        running_sum = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_P2], tl.float32)

    last_token = tl.minimum(first_token + BLOCK_Q, query_len) - 1
    key_end = num_computed + last_token + 1  # the tile's last query sees up to here
    first_visible = tl.maximum(num_computed + first_token - window + 1, 0)  # under a window
    key_start = tl.where(window > 0, (first_visible // BLOCK_N) * BLOCK_N, 0)
    for start in range(key_start, key_end, BLOCK_N):
        keys_at = start + tl.arange(0, BLOCK_N)  # key positions
        key_valid = keys_at < key_end
        blocks = tl.load(tables_ptr + seq * stride_table + keys_at // block_size, mask=key_valid, other=0).to(tl.int64)
        in_block = keys_at % block_size
        keys = tl.load(
            key_cache_ptr
            + blocks[None, :] * stride_key_block
            + in_block[None, :] * stride_key_slot
            + kv_head * stride_key_head
            + d[:, None],
            mask=key_valid[None, :] & (d[:, None] < HEAD_DIM),
            other=0.0,
        )  # [D_P2, BLOCK_N]
        if IEEE:
            scores = tl.dot(query, keys, input_precision="ieee")
        else:
            scores = tl.dot(query, keys)
        scores = scores * scale
        if HAS_SOFTCAP:  # softcap * tanh(scores / softcap), tanh from exp
            capped = scores / softcap
            e = tl.exp(-2.0 * tl.abs(capped))
            tanh = (1.0 - e) / (1.0 + e)
            scores = softcap * tl.where(capped < 0, -tanh, tanh)
        visible = row_valid[:, None] & key_valid[None, :] & (keys_at[None, :] <= position[:, None])
        visible = visible & ((window == 0) | (keys_at[None, :] > position[:, None] - window))
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that see nothing yet
        probs = tl.exp(scores - safe_max[:, None])
        rescale = tl.exp(running_max - safe_max)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        values = tl.load(
            value_cache_ptr
            + blocks[:, None] * stride_value_block
            + in_block[:, None] * stride_value_slot
            + kv_head * stride_value_head
            + dv[None, :],
            mask=key_valid[:, None] & (dv[None, :] < HEAD_DIM_V),
            other=0.0,
        )  # [BLOCK_N, DV_P2]
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values)
        running_max = new_max

    out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    tl.store(
        out_ptr + query_rows[:, None] * stride_out_token + head[:, None] * stride_out_head + dv[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (dv[None, :] < HEAD_DIM_V),
    )
