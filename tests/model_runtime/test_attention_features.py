"""Every path that attends honours each layer's features (sliding window,
soft-capping, sinks), against a float64 reference written from the
definitions: the C++ decode kernel on every instruction-set build, the
whole-layer C++ op, and Python's gather + SDPA / math fallback (float32 and
bfloat16 caches), on one mixed step of decode rows, a fresh prefill and
chunks after cached tokens. And blocks wholly before every query's window
may hold anything (another request's tokens, once they went back to the
pool) without changing a result."""

import math
import random

import pytest
import torch

from model_runtime import kernels
from model_runtime.attention.context import SequenceChunk, build_step
from model_runtime.attention.interface import LayerFeatures, attend
from model_runtime.attention.metadata import pack

CPU = torch.device("cpu")
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 32, 4
# (cached tokens, new tokens) per sequence: decode rows first, then prefills.
SEQUENCES = [(5, 1), (1, 1), (30, 1), (0, 9), (7, 5), (22, 3)]
FEATURES = {
    "plain": dict(),
    "window": dict(sliding_window=6),
    "window-of-one": dict(sliding_window=1),
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=5, softcap=2.0, sinks=True),
}


def features_of(name: str, dtype: torch.dtype = torch.float32, device: torch.device = CPU) -> LayerFeatures:
    options = dict(FEATURES[name])
    sinks = torch.linspace(-1.0, 2.0, HEADS, dtype=dtype, device=device) if options.pop("sinks", False) else None
    return LayerFeatures(scale=0.3, sinks=sinks, **options)


class Step:
    """A step over shuffled blocks: each sequence's cached K/V already in the
    cache (on ``device``), its new tokens' K/V as the model hands them; and
    every sequence's whole K/V and queries (on the CPU) for the reference.
    The shape defaults to the module's; tests/model_runtime/
    test_triton_attention.py varies it."""

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        garbage_before_window: int | None = None,
        *,
        sequences: list[tuple[int, int]] = SEQUENCES,  # (cached, new) tokens; decode rows first
        heads: int = HEADS,
        kv_heads: int = KV_HEADS,
        head_dim: int = HEAD_DIM,
        value_head_dim: int | None = None,
        block_size: int = BLOCK_SIZE,
        device: torch.device = CPU,
    ) -> None:
        value_head_dim = value_head_dim or head_dim
        self.sequences, self.heads, self.kv_heads, self.device = sequences, heads, kv_heads, device
        generator = torch.Generator().manual_seed(4)
        blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in sequences]
        order = list(range(sum(blocks_per_seq) + 2))
        random.Random(5).shuffle(order)
        self.key_cache = torch.zeros(len(order), block_size, kv_heads, head_dim, dtype=dtype)
        self.value_cache = torch.zeros(len(order), block_size, kv_heads, value_head_dim, dtype=dtype)
        self.keys, self.values, self.queries, chunks, start = [], [], [], [], 0
        for (cached, new), count in zip(sequences, blocks_per_seq):
            table = order[start : start + count]
            start += count
            keys = torch.randn(cached + new, kv_heads, head_dim, generator=generator).to(dtype)
            values = torch.randn(cached + new, kv_heads, value_head_dim, generator=generator).to(dtype)
            self.keys.append(keys)
            self.values.append(values)
            self.queries.append(torch.randn(new, heads, head_dim, generator=generator).to(dtype))
            for position in range(cached):
                self.key_cache[table[position // block_size], position % block_size] = keys[position]
                self.value_cache[table[position // block_size], position % block_size] = values[position]
            if garbage_before_window is not None:  # blocks no query of this step may see
                for index in range(max(cached - garbage_before_window + 1, 0) // block_size):
                    self.key_cache[table[index]] = 1e3 * torch.randn(block_size, kv_heads, head_dim, generator=generator).to(dtype)
                    self.value_cache[table[index]] = 1e3 * torch.randn(block_size, kv_heads, value_head_dim, generator=generator).to(dtype)
            chunks.append(SequenceChunk([0] * new, cached, table))
        self.chunks = chunks
        self.key_cache, self.value_cache = self.key_cache.to(device), self.value_cache.to(device)

    def inputs(self, with_mask: bool, triton: bool = False):
        """``attend``'s query, key, value ``[1, heads or kv_heads, T, head_dim]`` and the context."""
        _, _, context = build_step(self.chunks, [self.key_cache], [self.value_cache], self.device, with_mask, triton)
        new_keys = torch.cat([keys[cached:] for keys, (cached, _) in zip(self.keys, self.sequences)])  # [T, kv_heads, head_dim]
        new_values = torch.cat([values[cached:] for values, (cached, _) in zip(self.values, self.sequences)])
        query = torch.cat(self.queries)  # [T, heads, head_dim]
        return tuple(t.transpose(0, 1)[None].to(self.device) for t in (query, new_keys, new_values)) + (context,)

    def expected(self, features: LayerFeatures) -> torch.Tensor:
        """``[T, heads, value_head_dim]`` float64 on the CPU, row by row from the definitions."""
        rows = []
        sinks = features.sinks.cpu() if features.sinks is not None else None
        for (cached, new), keys, values, queries in zip(self.sequences, self.keys, self.values, self.queries):
            for offset in range(new):
                position = cached + offset
                first = max(position - features.sliding_window + 1, 0) if features.sliding_window else 0
                heads = []
                for head in range(self.heads):
                    kv_head = head // (self.heads // self.kv_heads)
                    scores = [
                        float(queries[offset, head].double() @ keys[j, kv_head].double()) * features.scale
                        for j in range(first, position + 1)
                    ]
                    if features.softcap:
                        scores = [features.softcap * math.tanh(s / features.softcap) for s in scores]
                    logits = scores + ([float(sinks[head])] if sinks is not None else [])
                    top = max(logits)
                    weights = [math.exp(s - top) for s in logits]
                    total = sum(weights)
                    out = sum(w / total * values[first + j, kv_head].double() for j, w in enumerate(weights[: len(scores)]))
                    heads.append(out)
                rows.append(torch.stack(heads))
        return torch.stack(rows)


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.load()
    assert loaded is not None, "the kernels did not build here (a C++ compiler is on every machine of this project)"
    return loaded


def decode_on_every_isa(ops, step: Step, features: LayerFeatures, rows: slice = slice(None)) -> None:
    """The decode kernel's rows of ``step`` on every instruction set, each checked against the float64
    reference; with ``rows``, those rows alone must also be the batch's to the bit (a row does not depend
    on its batch)."""
    query, key, value, context = step.inputs(with_mask=False)
    ops.write_kv_cache(key[0], value[0], step.key_cache, step.value_cache, context.slot_mapping)
    num_decode = context.num_decode_tokens
    expected = step.expected(features)[:num_decode]
    queries = query[0, :, :num_decode].transpose(0, 1)
    tables, lens = context.decode_block_tables, context.decode_context_lens
    options = (features.sliding_window or 0, features.softcap or 0.0, features.sinks)
    for isa in range(len(ops.isas())):
        got = ops.paged_decode_attention(queries, step.key_cache, step.value_cache, tables, lens, features.scale, isa, *options)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5, msg=ops.isas()[isa])
        some = ops.paged_decode_attention(
            queries[rows], step.key_cache, step.value_cache, tables[rows], lens[rows], features.scale, isa, *options
        )
        assert torch.equal(some, got[rows]), ops.isas()[isa]


@pytest.mark.parametrize("name", FEATURES)
def test_the_decode_kernel_honours_the_features_on_every_isa(ops, name: str):
    decode_on_every_isa(ops, Step(), features_of(name))


# Decode rows of 1, 2, 3 and 5 spans of 128 visible tokens (ts_paged_decode reads a longer sequence a span an item
# and merges the spans' softmaxes), a span exactly full, and with the features a window of 200 (2 spans) or 300.
LONG = [(128, 1), (299, 1), (126, 1), (519, 1), (255, 1)]


@pytest.mark.parametrize(
    "options", [{}, dict(sinks=True), dict(softcap=2.0), dict(sliding_window=200, softcap=2.0, sinks=True), dict(sliding_window=300)]
)
def test_long_contexts_read_in_spans_give_the_whole_softmax_on_every_isa(ops, options: dict):
    """Every row against the float64 reference, and each sequence's row the same to the bit alone as in the
    batch: where a sequence is split depends on its own length only."""
    options = dict(options)
    sinks = torch.linspace(-1.0, 2.0, HEADS) if options.pop("sinks", False) else None
    features = LayerFeatures(scale=0.3, sinks=sinks, **options)
    for row in range(len(LONG)):
        decode_on_every_isa(ops, Step(sequences=LONG), features, slice(row, row + 1))


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("path", ["whole-layer op", "python kernel decode", "python sdpa"])
def test_every_path_honours_the_features_on_a_mixed_step(ops, name: str, path: str):
    features = features_of(name)
    step = Step()
    query, key, value, context = step.inputs(with_mask=path == "python sdpa")
    if path == "whole-layer op":
        got = ops.paged_attention_step(
            query,
            key,
            value,
            step.key_cache,
            step.value_cache,
            pack(context),
            features.scale,
            features.sliding_window or 0,
            features.softcap or 0.0,
            features.sinks,
        )
    else:
        got = attend(query, key, value, step.key_cache, step.value_cache, context, features)
    torch.testing.assert_close(got[0].double(), step.expected(features), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["window", "all"])
def test_bfloat16_caches_honour_the_features(name: str):
    features = features_of(name, torch.bfloat16)
    step = Step(torch.bfloat16)
    query, key, value, context = step.inputs(with_mask=True)
    got = attend(query, key, value, step.key_cache, step.value_cache, context, features)
    torch.testing.assert_close(got[0].double(), step.expected(features), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("path", ["whole-layer op", "python kernel decode", "python sdpa"])
def test_blocks_before_the_window_change_nothing(ops, path: str):
    features = features_of("all")
    step = Step(garbage_before_window=features.sliding_window)
    assert step.key_cache.abs().max() > 100, "some block lies wholly before its sequence's window"
    query, key, value, context = step.inputs(with_mask=path == "python sdpa")
    if path == "whole-layer op":
        got = ops.paged_attention_step(
            query,
            key,
            value,
            step.key_cache,
            step.value_cache,
            pack(context),
            features.scale,
            features.sliding_window,
            features.softcap,
            features.sinks,
        )
    else:
        got = attend(query, key, value, step.key_cache, step.value_cache, context, features)
    torch.testing.assert_close(got[0].double(), step.expected(features), rtol=1e-4, atol=1e-5)
