"""The Triton paged-attention kernels (model_runtime/attention/triton_paged.py),
run in Triton's interpreter on the CPU, against a float64 reference written
from the definitions: ragged steps of decode rows and prefill chunks (fresh
and after cached tokens) over shuffled blocks, with grouped-query heads of
every group size, head sizes that are not powers of two, values of another
size than keys (DeepSeek's), any block size, sliding windows, soft-capping
and sinks; and the cache write, which skips padded rows (slot -1). The same
kernels, compiled, run on CUDA in ``make gpu-check``."""

import math
import random

import pytest
import torch

from model_runtime.attention import triton_paged
from model_runtime.attention.context import SequenceChunk, build_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not (triton_paged.runs(DEVICE) or triton_paged.interpreted()), reason="Triton is not installed, or not interpreted without CUDA"
)
# (cached tokens, new tokens) per sequence: decode rows first, then prefills.
MIXED = [(5, 1), (0, 1), (40, 1), (0, 19), (7, 5), (33, 3)]
DECODE_ONLY = [(5, 1), (0, 1), (40, 1), (17, 1)]


class Case:
    """A step over shuffled blocks: each sequence's cached K/V already in the
    cache, its new tokens' K/V as the model hands them."""

    def __init__(self, sequences, heads=6, kv_heads=2, head_dim=32, value_head_dim=None, block_size=4, dtype=torch.float32):
        value_head_dim = value_head_dim or head_dim
        generator = torch.Generator().manual_seed(7)
        blocks_per_seq = [-(-(cached + new) // block_size) for cached, new in sequences]
        order = list(range(sum(blocks_per_seq) + 3))
        random.Random(3).shuffle(order)
        self.sequences, self.heads, self.dtype = sequences, heads, dtype
        self.key_cache = torch.zeros(len(order), block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
        self.value_cache = torch.zeros(len(order), block_size, kv_heads, value_head_dim, dtype=dtype, device=DEVICE)
        self.keys, self.values, self.queries, self.chunks, start = [], [], [], [], 0
        for (cached, new), count in zip(sequences, blocks_per_seq):
            table = order[start : start + count]
            start += count
            self.keys.append(torch.randn(cached + new, kv_heads, head_dim, generator=generator).to(DEVICE, dtype))
            self.values.append(torch.randn(cached + new, kv_heads, value_head_dim, generator=generator).to(DEVICE, dtype))
            self.queries.append(torch.randn(new, heads, head_dim, generator=generator).to(DEVICE, dtype))
            for position in range(cached):
                self.key_cache[table[position // block_size], position % block_size] = self.keys[-1][position]
                self.value_cache[table[position // block_size], position % block_size] = self.values[-1][position]
            self.chunks.append(SequenceChunk([0] * new, cached, table))

    def run(self, window=None, softcap=None, sinks=None, scale=0.3) -> torch.Tensor:
        """The kernels' ``[T, heads, value_head_dim]``, the new K/V written first."""
        _, _, context = build_step(self.chunks, [self.key_cache], [self.value_cache], DEVICE, with_mask=True, triton=True)
        new_keys = torch.cat([keys[cached:] for keys, (cached, _) in zip(self.keys, self.sequences)])  # [T, kv_heads, d]
        new_values = torch.cat([values[cached:] for values, (cached, _) in zip(self.values, self.sequences)])
        triton_paged.write_cache(
            new_keys.transpose(0, 1), new_values.transpose(0, 1), self.key_cache, self.value_cache, context.triton.slot_mapping
        )
        query = torch.cat(self.queries).transpose(0, 1)  # [heads, T, d]: a transposed view, as the model hands it
        return triton_paged.attention(query, self.key_cache, self.value_cache, context.triton, scale, window, softcap, sinks)

    def expected(self, window=None, softcap=None, sinks=None, scale=0.3) -> torch.Tensor:
        """``[T, heads, value_head_dim]`` float64, row by row from the definitions."""
        rows = []
        sinks = sinks.cpu() if sinks is not None else None
        for keys, values, queries, (cached, new) in zip(self.keys, self.values, self.queries, self.sequences):
            group = self.heads // keys.shape[1]
            keys = keys.cpu().double().repeat_interleave(group, dim=1)  # [L, heads, d]
            values = values.cpu().double().repeat_interleave(group, dim=1)
            for index in range(new):
                position = cached + index
                first = max(position - window + 1, 0) if window else 0
                scores = torch.einsum("hd,lhd->hl", queries[index].cpu().double(), keys[first : position + 1]) * scale
                if softcap:
                    scores = softcap * torch.tanh(scores / softcap)
                if sinks is not None:
                    scores = torch.cat([scores, sinks.double()[:, None]], dim=1)
                probs = torch.softmax(scores, dim=1)[:, : position + 1 - first]
                rows.append(torch.einsum("hl,lhd->hd", probs, values[first : position + 1]))
        return torch.stack(rows)


FEATURES = {
    "plain": dict(),
    "window": dict(window=6),
    "window-of-one": dict(window=1),
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=True),
    "all": dict(window=5, softcap=2.0, sinks=True),
}


def _features(name: str, heads: int, dtype: torch.dtype = torch.float32) -> dict:
    options = dict(FEATURES[name])
    if options.pop("sinks", False):
        options["sinks"] = torch.linspace(-1.0, 2.0, heads, dtype=dtype, device=DEVICE)
    return options


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("sequences", [MIXED, DECODE_ONLY], ids=["mixed", "decode-only"])
def test_every_feature_on_a_ragged_step(name, sequences):
    case = Case(sequences)
    features = _features(name, case.heads)
    torch.testing.assert_close(case.run(**features).cpu().double(), case.expected(**features), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [
        dict(heads=4, kv_heads=4, head_dim=16),  # no grouping
        dict(heads=7, kv_heads=1, head_dim=24),  # a group of 7 (not a power of two), head size 24
        dict(heads=6, kv_heads=2, head_dim=40, block_size=5),  # head size 40, a block size of 5
        dict(heads=4, kv_heads=2, head_dim=48, value_head_dim=32, block_size=16),  # values smaller than keys
        dict(heads=8, kv_heads=2, head_dim=64, block_size=16),  # a 0.5B model's layer
    ],
    ids=["mha", "group-7", "d40-bs5", "dv32", "d64-bs16"],
)
def test_shapes(shape):
    case = Case(MIXED, **shape)
    torch.testing.assert_close(case.run(window=9).cpu().double(), case.expected(window=9), atol=1e-5, rtol=1e-5)


# Triton's interpreter multiplies bfloat16 blocks as raw integers (numpy has no
# bfloat16), so bfloat16 runs on CUDA only; float16 takes the same path here.
HALF_DTYPES = [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_cache(dtype):
    case = Case(MIXED, dtype=dtype)
    features = _features("all", case.heads, dtype)
    torch.testing.assert_close(case.run(**features).cpu().double(), case.expected(**features), atol=3e-2, rtol=3e-2)


def test_cache_write_skips_padded_rows():
    """A slot of -1 (a padded row of a captured decode graph) writes nothing."""
    key_cache = torch.zeros(3, 4, 2, 24, device=DEVICE)
    value_cache = torch.zeros(3, 4, 2, 16, device=DEVICE)
    keys, values = torch.randn(2, 3, 24, device=DEVICE), torch.randn(2, 3, 16, device=DEVICE)  # [kv_heads, T, d]
    slots = torch.tensor([5, -1, 8], dtype=torch.int32, device=DEVICE)
    triton_paged.write_cache(keys, values, key_cache, value_cache, slots)
    expected_keys, expected_values = torch.zeros_like(key_cache), torch.zeros_like(value_cache)
    for token, slot in ((0, 5), (2, 8)):
        expected_keys.view(-1, 2, 24)[slot] = keys[:, token]
        expected_values.view(-1, 2, 16)[slot] = values[:, token]
    assert torch.equal(key_cache, expected_keys) and torch.equal(value_cache, expected_values)


def test_a_row_that_sees_nothing_is_zero_not_nan():
    """A padded tile row (no keys visible) must not poison a real row: its
    output is zero, and the real rows beside it are unchanged."""
    case = Case([(3, 1)], heads=2, kv_heads=1, head_dim=16)
    out = case.run()
    assert not math.isnan(out.sum().item())
    torch.testing.assert_close(out.cpu().double(), case.expected(), atol=1e-5, rtol=1e-5)


# Through the runner: greedy float32 outputs equal ``generate``, with every
# layer's attention in these kernels (forced on the CPU, as CUDA picks them),
# over chunked prefills, decode rows beside them and preemption.
RUNNER_MODELS = ["gpt-oss", "deepseek-v3"]  # windows and sinks; values unlike keys (soft-capping: the kernel tests above)
RUNNER_PROMPT_LENGTHS = [1, 29, 45]  # past the zoo's window of 24


@pytest.mark.skipif(not triton_paged.interpreted(), reason="on CUDA, make gpu-check's parity matrix runs the engine")
@pytest.mark.parametrize("name", RUNNER_MODELS)
def test_greedy_parity_through_the_runner(name, tmp_path, default_model_dir, monkeypatch):
    from model_runtime.loading.loader import load_model
    from tests.model_runtime.test_parity import build, reference_outputs, run_engine
    from tests.model_zoo import build as build_zoo_model

    monkeypatch.setattr(triton_paged, "runs", lambda device: True)  # the load-time probe runs them too
    model_dir = build_zoo_model(name, tmp_path / name, default_model_dir)
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    vocab_size = loaded.model.config.vocab_size
    prompts = [[(7 * n + 3 * i) % (vocab_size - 3) + 3 for i in range(n)] for n in RUNNER_PROMPT_LENGTHS]
    expected = reference_outputs(model_dir, prompts, lambda index: 6)
    core = build(loaded, num_kv_blocks=8, max_num_batched_tokens=24, block_size=8)
    assert core.runner.triton_attention
    assert run_engine(core, prompts, max_tokens_of=lambda index: 6) == expected
    assert core.scheduler.num_preemptions > 0


def test_inputs_whose_last_dimension_is_strided():
    """A query or new keys whose head elements are not adjacent in memory
    are read as their values, not their storage."""
    expected = Case(MIXED).run(window=9)
    case = Case(MIXED)  # the same step over a fresh cache
    _, _, context = build_step(case.chunks, [case.key_cache], [case.value_cache], DEVICE, with_mask=True, triton=True)
    new_keys = torch.cat([keys[cached:] for keys, (cached, _) in zip(case.keys, MIXED)]).transpose(0, 1)  # [kv_heads, T, d]
    new_values = torch.cat([values[cached:] for values, (cached, _) in zip(case.values, MIXED)]).transpose(0, 1)

    def strided(tensor: torch.Tensor) -> torch.Tensor:  # the same values, the last dimension's elements apart
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)

    triton_paged.write_cache(strided(new_keys), strided(new_values), case.key_cache, case.value_cache, context.triton.slot_mapping)
    query = strided(torch.cat(case.queries).transpose(0, 1))
    assert query.stride(-1) != 1
    got = triton_paged.attention(query, case.key_cache, case.value_cache, context.triton, 0.3, 9, None, None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
