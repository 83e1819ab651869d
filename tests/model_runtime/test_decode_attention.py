"""``tokenstep::paged_decode_attention`` against the gather + SDPA path it
replaces: ragged context lengths over shuffled blocks, GQA groups, head
sizes, every instruction-set build; and clear refusals. The cache-write op,
and the whole-layer op (``paged_attention_step``) against ``attend``."""

import pytest
import torch
import torch.nn.functional as F

from model_runtime import kernels
from model_runtime.attention.context import PrefillSpan, StepContext, decode_tables
from model_runtime.attention.interface import LayerFeatures, attend, decode_kernel_runs, gather_blocks
from model_runtime.attention.metadata import pack
from model_runtime.kv_cache import CacheShape, LayerKV

LENS = [1, 2, 15, 16, 17, 33, 100, 250]


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.load()
    assert loaded is not None, "the kernels did not build here (a C++ compiler is on every machine of this project)"
    return loaded


def ragged_batch(block_size: int, kv_heads: int, head_dim: int, heads: int):
    torch.manual_seed(0)
    num_blocks = sum(-(-n // block_size) for n in LENS) + 3
    key_cache, value_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).unbind(0)
    order = torch.randperm(num_blocks).tolist()
    tables, start = [], 0
    for n in LENS:
        count = -(-n // block_size)
        tables.append(order[start : start + count])
        start += count
    query = torch.randn(heads, len(LENS), head_dim)  # as the model hands it: [heads, B, head_dim]
    return query, key_cache.contiguous(), value_cache.contiguous(), tables


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"), [(9, 3, 64, 16), (4, 4, 16, 4), (8, 2, 128, 32), (2, 1, 32, 16), (4, 2, 512, 16)]
)
def test_matches_gather_and_sdpa_on_every_isa(ops, heads: int, kv_heads: int, head_dim: int, block_size: int):
    query, key_cache, value_cache, tables = ragged_batch(block_size, kv_heads, head_dim, heads)
    block_tables, lens, mask = decode_tables(tables, LENS, block_size, torch.device("cpu"))
    keys, values = gather_blocks(key_cache, block_tables), gather_blocks(value_cache, block_tables)
    expected = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(2), keys, values, attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads
    ).squeeze(2)
    for isa in range(len(ops.isas())):
        got = ops.paged_decode_attention(query.transpose(0, 1), key_cache, value_cache, block_tables, lens, 0.3, isa)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=ops.isas()[isa])


def test_refuses_bad_operands_clearly(ops):
    query, key_cache, value_cache, tables = ragged_batch(16, 3, 64, 9)
    block_tables, lens, _ = decode_tables(tables, LENS, 16, torch.device("cpu"), with_mask=False)
    q = query.transpose(0, 1)
    with pytest.raises(RuntimeError, match="has 300 cached tokens, its table room for 256"):
        ops.paged_decode_attention(q, key_cache, value_cache, block_tables, lens.clone().fill_(300), 1.0)
    bad_tables = block_tables.clone()
    bad_tables[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="block id 10000 out of range"):
        ops.paged_decode_attention(q, key_cache, value_cache, bad_tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="8 query heads are not a multiple of 3 KV heads"):
        ops.paged_decode_attention(q[:, :8], key_cache, value_cache, block_tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 16 up to 512"):
        ops.paged_decode_attention(
            q[..., :24], key_cache[..., :24].contiguous(), value_cache[..., :24].contiguous(), block_tables, lens, 1.0
        )


def test_the_kernel_runs_only_where_it_applies(ops):
    cpu = torch.device("cpu")
    assert decode_kernel_runs(CacheShape.uniform(2, 3, 64, torch.float32), cpu)
    assert decode_kernel_runs(
        CacheShape((LayerKV(4, 256, 256), LayerKV(2, 512, 512)), torch.float32), cpu
    )  # Gemma 4's sliding and full layers
    assert not decode_kernel_runs(CacheShape.uniform(2, 3, 64, torch.bfloat16), cpu)  # bf16 caches: SDPA
    assert not decode_kernel_runs(CacheShape.uniform(2, 3, 72, torch.float32), cpu)  # a head size it does not take
    assert not decode_kernel_runs(CacheShape.uniform(2, 3, 64, torch.float32, value_head_dim=32), cpu)  # keys and values of two sizes


def test_write_kv_cache_matches_index_copy(ops):
    torch.manual_seed(1)
    key_cache, value_cache = torch.zeros(2, 6, 4, 3, 16).unbind(0)
    key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    key, value = torch.randn(2, 1, 5, 3, 16).unbind(0)
    key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [kv_heads, T, head_dim], strided as the model's
    slots = torch.tensor([0, 5, 23, 7, 12])
    expected_keys.view(-1, 3, 16).index_copy_(0, slots, key.transpose(0, 1))
    expected_values.view(-1, 3, 16).index_copy_(0, slots, value.transpose(0, 1))
    ops.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_keys) and torch.equal(value_cache, expected_values)
    with pytest.raises(RuntimeError, match="slot 24 out of range"):
        ops.write_kv_cache(key, value, key_cache, value_cache, torch.tensor([0, 1, 2, 3, 24]))


def test_the_whole_layer_op_matches_attend_on_a_mixed_step(ops):
    """Three decode rows, a fresh prefill and a chunk after cached tokens, in
    one step: tokenstep::paged_attention_step writes the same caches and
    returns what attention.attend (Python, gather + SDPA for the prefills)
    does."""
    torch.manual_seed(3)
    heads, kv_heads, head_dim, block_size = 6, 2, 32, 4
    key_cache, value_cache = (t.contiguous() for t in torch.randn(2, 24, block_size, kv_heads, head_dim).unbind(0))
    decode_tables_ = [[3, 7], [1], [9, 10, 11]]
    decode_lens = [6, 2, 12]  # the new token is each one's last
    fresh = (5, 0, [12, 13])  # (tokens, cached, blocks)
    resumed = (3, 6, [14, 15, 16])
    slots = [table[(n - 1) // block_size] * block_size + (n - 1) % block_size for table, n in zip(decode_tables_, decode_lens)]
    for new, cached, blocks in (fresh, resumed):
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    num_tokens = len(slots)
    tables, lens, _ = decode_tables(decode_tables_, decode_lens, block_size, torch.device("cpu"), with_mask=False)
    prefills = [PrefillSpan(3, 5, 0, torch.tensor(fresh[2])), PrefillSpan(8, 3, 6, torch.tensor(resumed[2]))]
    context = StepContext([], [], torch.tensor(slots), 3, tables, lens, None, prefills)
    query = torch.randn(1, num_tokens, heads, head_dim).transpose(1, 2)  # [1, heads, T, head_dim], strided as the model's
    key, value = (torch.randn(1, num_tokens, kv_heads, head_dim).transpose(1, 2) for _ in range(2))
    caches = (key_cache.clone(), value_cache.clone())
    expected = attend(query, key, value, *caches, context, LayerFeatures(0.25))
    got = ops.paged_attention_step(query, key, value, key_cache, value_cache, pack(context), 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(key_cache, caches[0]) and torch.equal(value_cache, caches[1])
    with pytest.raises(RuntimeError, match="metadata does not describe this step"):
        ops.paged_attention_step(query[:, :, :5], key[:, :, :5], value[:, :, :5], key_cache, value_cache, pack(context), 0.25)
