"""The Triton paged-attention kernels (model_runtime/attention/triton_paged.py),
run in Triton's interpreter on the CPU, against a float64 reference written
from the definitions: ragged steps of decode rows and prefill chunks (fresh
and after cached tokens) over shuffled blocks, with grouped-query heads of
every group size, head sizes that are not powers of two, values of another
size than keys (DeepSeek's), any block size, sliding windows, soft-capping
and sinks; and the cache write, which skips padded rows (slot -1). The same
kernels, compiled, run on CUDA in ``make gpu-check``."""

import pytest
import torch

from model_runtime.attention import triton_paged
from model_runtime.attention.interface import LayerFeatures
from tests.model_runtime.test_attention_features import FEATURES, Step, features_of

# On CUDA the kernels are compiled; elsewhere tests/conftest.py has set
# TRITON_INTERPRET=1 before Triton's first import, and they are interpreted.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (cached tokens, new tokens) per sequence: decode rows first (one of a first
# token), then prefills (one of two tiles).
MIXED = [(5, 1), (0, 1), (40, 1), (0, 19), (7, 5), (33, 3)]
DECODE_ONLY = [(5, 1), (0, 1), (40, 1), (17, 1)]


def run_kernels(step: Step, features: LayerFeatures, strided: bool = False) -> torch.Tensor:
    """The kernels' ``[T, heads, value_head_dim]`` on the CPU: the step's new K/V
    written first, then attention, from the inputs as the model hands them."""
    query, key, value, context = step.inputs(with_mask=True, triton=True)
    if strided:  # the same values, a head's elements apart in memory
        query, key, value = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (query, key, value))
        assert query.stride(-1) != 1
    triton_paged.write_cache(key[0], value[0], step.key_cache, step.value_cache, context.triton.slot_mapping)
    scale, window, softcap, sinks = features.scale, features.sliding_window, features.softcap, features.sinks
    return triton_paged.attention(query[0], step.key_cache, step.value_cache, context.triton, scale, window, softcap, sinks).cpu()


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("sequences", [MIXED, DECODE_ONLY], ids=["mixed", "decode-only"])
def test_every_feature_on_a_ragged_step(name, sequences):
    step = Step(sequences=sequences, device=DEVICE)
    features = features_of(name, device=DEVICE)
    torch.testing.assert_close(run_kernels(step, features).double(), step.expected(features), atol=1e-5, rtol=1e-5)


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
    step = Step(sequences=MIXED, device=DEVICE, **shape)
    features = LayerFeatures(scale=0.3, sliding_window=9)
    torch.testing.assert_close(run_kernels(step, features).double(), step.expected(features), atol=1e-5, rtol=1e-5)


# Triton's interpreter multiplies bfloat16 blocks as raw integers (numpy has no
# bfloat16), so bfloat16 runs on CUDA only; float16 takes the same path here.
HALF_DTYPES = [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_cache(dtype):
    step = Step(dtype, sequences=MIXED, device=DEVICE)
    features = features_of("all", dtype, DEVICE)
    torch.testing.assert_close(run_kernels(step, features).double(), step.expected(features), atol=3e-2, rtol=3e-2)


def test_inputs_whose_last_dimension_is_strided():
    """A query or new keys and values whose head elements are not adjacent
    in memory are read as their values, not their storage."""
    features = features_of("window")
    expected = run_kernels(Step(sequences=MIXED, device=DEVICE), features)
    torch.testing.assert_close(run_kernels(Step(sequences=MIXED, device=DEVICE), features, strided=True), expected, atol=1e-6, rtol=1e-6)


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
    """A padded tile row (no keys visible) must not poison a real row: the
    output is finite and the real row is right."""
    step = Step(sequences=[(3, 1)], heads=2, kv_heads=1, head_dim=16, device=DEVICE)
    features = features_of("plain")
    out = run_kernels(step, features)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), step.expected(features), atol=1e-5, rtol=1e-5)


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
