"""``--quantization int8``: the int8 kernel against torch's GEMM on the same
dequantized weight (every instruction-set build this CPU runs, ragged shapes),
groupwise quantization, the fallback without kernels, the load-time switch rule, and greedy parity
with ``model.generate`` on the dequantized model."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from model_runtime import kernels
from model_runtime.loading.loader import load_model
from model_runtime.weights import quantization
from model_runtime.weights.quantization import (
    _PROBE_PASSES,
    GROUP,
    Int8Linear,
    best_seconds_each,
    dequantize_groups,
    gemm_from_rows_given,
    linear_weight,
    quantize_groups,
    timings_text,
)
from tests.model_runtime.test_parity import build, generate_outputs, make_prompts, run_engine

ROWS = (1, 2, 3, 4, 5, 7, 16, 63, 64, 65, 130)
FALLBACK_PROMPTS = [[5, 6, 7], list(range(100, 140))]
SHAPES = ((1, 1), (7, 3), (16, 4), (33, 9), (576, 64), (100, 130))  # (in, out)


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.load()
    assert loaded is not None, "the kernels did not build here (a C++ compiler is on every machine of this project)"
    return loaded


def reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return nn.functional.linear(x.double(), dequantize_groups(q, scales, offsets).double(), None if bias is None else bias.double())


def test_quantize_groups_is_within_half_a_step_of_each_group():
    weight = torch.randn(9, 100) * torch.logspace(-3, 2, 9)[:, None] + torch.linspace(-1, 1, 9)[:, None]
    weight[4] = 0.25  # constant: exact
    weight[5, :GROUP] = 0
    q, scales, offsets = quantize_groups(weight)
    assert q.dtype == torch.int8 and q.shape == (9, 100) and scales.shape == offsets.shape == (9, 4)
    step = scales[:, torch.arange(100) // GROUP]
    assert ((weight - dequantize_groups(q, scales, offsets)).abs() <= step / 2 + 1e-6 * weight.abs().max()).all()
    assert torch.equal(dequantize_groups(q, scales, offsets)[4], weight[4])
    assert (dequantize_groups(q, scales, offsets)[5, :GROUP] == 0).all()


def test_every_isa_matches_the_dequantized_gemm(ops):
    torch.manual_seed(0)
    isas = ops.isas()
    assert isas[-1] == "generic" and len(isas) >= 1
    for in_features, out_features in SHAPES:
        q, scales, offsets = quantize_groups(torch.randn(out_features, in_features) + 0.3)
        bias = torch.randn(out_features)
        for rows in ROWS:
            x = torch.randn(rows, in_features)
            for with_bias in (True, False):
                expected = reference(x, q, scales, offsets, bias if with_bias else None)
                for isa in range(len(isas)):
                    got = ops.int8_linear(x, q, scales, offsets, bias if with_bias else None, isa)
                    assert got.shape == (rows, out_features) and got.dtype == torch.float32
                    torch.testing.assert_close(
                        got.double(),
                        expected,
                        rtol=1e-4,
                        atol=1e-4 * in_features**0.5,
                        msg=f"{isas[isa]} {rows}x{in_features}->{out_features}",
                    )


def test_every_isa_dequantizes_as_torch_does(ops):
    q, scales, offsets = quantize_groups(torch.randn(37, 101))
    for isa in range(len(ops.isas())):  # the kernel fuses q * scale + offset: one rounding, not two
        torch.testing.assert_close(
            ops.int8_dequantize(q, scales, offsets, isa), dequantize_groups(q, scales, offsets), rtol=1e-6, atol=1e-6
        )


def test_kernel_takes_leading_dims_and_strided_inputs(ops):
    q, scales, offsets = quantize_groups(torch.randn(24, 40))
    x = torch.randn(2, 40, 3).transpose(1, 2)  # [2, 3, 40], not contiguous
    got = ops.int8_linear(x, q, scales, offsets, None)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.double(), reference(x, q, scales, offsets, None), rtol=1e-4, atol=1e-4)
    assert ops.int8_linear(torch.randn(0, 40), q, scales, offsets, None).shape == (0, 24)


def test_kernel_refuses_bad_operands_clearly(ops):
    q, scales, offsets = quantize_groups(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.int8_linear(torch.randn(2, 16).double(), q, scales, offsets, None)
    with pytest.raises(RuntimeError, match="x has 15 features, the weight 16"):
        ops.int8_linear(torch.randn(2, 15), q, scales, offsets, None)
    with pytest.raises(RuntimeError, match=r"offsets must be contiguous float32 \[8, 1\]"):
        ops.int8_linear(torch.randn(2, 16), q, scales, offsets[:4], None)
    with pytest.raises(RuntimeError, match="isa index"):
        ops.int8_linear(torch.randn(2, 16), q, scales, offsets, None, 99)


def test_both_paths_of_a_module_agree_and_conv1d_is_read_transposed(ops):
    torch.manual_seed(1)
    linear = nn.Linear(48, 20)
    conv = Conv1D(20, 48)  # GPT-2's layer: weight [in, out]
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    assert torch.equal(linear_weight(conv), linear.weight)
    with_kernel = Int8Linear.quantize(linear.weight, linear.bias, ops)
    without = Int8Linear.quantize(linear_weight(conv), conv.bias, None)
    for rows in (1, 9, 300):
        x = torch.randn(rows, 48)
        torch.testing.assert_close(with_kernel(x), without(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(without(x), linear(x), rtol=0.05, atol=0.05)  # int8 rounding only


def test_gemm_switch_rule_on_scripted_timings():
    def scripted(gemm_wins_from: int | None):
        probed = []

        def switch_s(rows: int) -> tuple[float, float]:
            probed.append(rows)
            gemm_wins = gemm_wins_from is not None and rows >= gemm_wins_from
            return (2.0, 1.0) if gemm_wins else (1.0, 2.0)

        return switch_s, probed

    switch_s, probed = scripted(None)
    assert gemm_from_rows_given(switch_s) == float("inf") and probed == [256]
    switch_s, probed = scripted(64)
    assert gemm_from_rows_given(switch_s) == 64 and probed == [256, 128, 64, 32]
    switch_s, _ = scripted(1)
    assert gemm_from_rows_given(switch_s) == 32


def test_without_a_compiler_the_kernels_fall_back_to_torch_with_the_same_tokens(tmp_path: Path, tiny_llama_dir: Path):
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from model_runtime import kernels, paths; from model_runtime.loading.loader import load_model\n"
        f"paths.configure({str(tmp_path)!r})\n"
        "from model_runtime.weights.quantization import GroupwiseLinear\n"
        "from tests.model_runtime.test_parity import build, run_engine\n"
        "assert kernels.load() is None\n"
        f"loaded = load_model({str(tiny_llama_dir)!r}, 'float32', 'cpu', 'int8', activations='int16')\n"
        "assert not any(isinstance(m, GroupwiseLinear) for m in loaded.model.modules())  # float32 linears of the same values\n"
        f"print(run_engine(build(loaded, num_kv_blocks=64), {FALLBACK_PROMPTS!r}))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernels are unavailable, using plain PyTorch" in result.stderr
    assert "--activations int16 needs tokenstep's CPU kernels, which are unavailable" in result.stderr
    serving = next(line for line in result.stderr.splitlines() if "serving: " in line)
    assert "weights int8 groups of 32 (quantized at load), dequantized to float32 (no kernels)" in serving, serving
    assert "activations float32 (--activations int16 needs the kernels)" in serving
    assert "kernels off: unavailable (no C++ compiler" in serving and "decode attention gather + PyTorch SDPA" in serving
    with_kernels = run_engine(build(load_model(tiny_llama_dir, "float32", "cpu", "int8"), num_kv_blocks=64), FALLBACK_PROMPTS)
    assert result.stdout.strip() == repr(with_kernels)


def test_int8_needs_the_cpu_and_float32(tiny_llama_dir: Path):
    with pytest.raises(ValueError, match="int8 runs on the CPU with float32 activations"):
        load_model(tiny_llama_dir, dtype="bfloat16", device="cpu", quantization="int8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_model(tiny_llama_dir, dtype="float32", device="cpu", quantization="int4")


def dequantized_reference(model_dir: Path) -> nn.Module:
    """The float32 model with every linear's weight replaced by its int8
    values times their scales (untied from the input embedding, as served)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                weight = linear_weight(child)
                if weight is None:
                    continue
                replacement = nn.Linear(weight.shape[1], weight.shape[0], bias=child.bias is not None)
                replacement.weight = nn.Parameter(dequantize_groups(*quantize_groups(weight)))
                replacement.bias = child.bias
                setattr(parent, name, replacement)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_greedy_parity_with_generate_on_the_dequantized_model(family: str, request: pytest.FixtureRequest):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    loaded = load_model(model_dir, dtype="float32", device="cpu", quantization="int8")
    assert all(not isinstance(m, (nn.Linear, Conv1D)) for m in loaded.model.modules())
    prompts = make_prompts(seed=3, vocab_size=loaded.model.config.vocab_size)
    reference_model = dequantized_reference(model_dir)
    expected = generate_outputs(reference_model, prompts)
    assert run_engine(build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096), prompts) == expected
    assert run_engine(build(loaded, num_kv_blocks=40, max_num_batched_tokens=37), prompts, id_prefix="p") == expected  # chunked, preempted


def test_the_op_switches_to_dequantize_and_gemm_from_gemm_from_rows(ops):
    torch.manual_seed(5)
    module = Int8Linear.quantize(torch.randn(48, 96), torch.randn(48), ops)
    x = torch.randn(6, 96)
    gemm = module.gemm_forward(x)
    assert torch.equal(module.kernel_forward(x, gemm_from_rows=6), gemm)  # 6 rows >= 6: dequantize + GEMM inside the op
    assert not torch.equal(module.kernel_forward(x, gemm_from_rows=7), gemm)  # below it: the kernel (other summation order)
    module.gemm_from_rows = 4
    assert torch.equal(module(x), gemm) and torch.allclose(module(x[:3]), module.gemm_forward(x[:3]), atol=1e-4)


def timed_calls(monkeypatch, calls: dict[str, int]):
    """Calls that take exactly the seconds they are given, on a clock the
    probe reads instead of the host's: sleeps on a loaded 2-core machine
    overshoot by milliseconds, more than the rule's margins here."""
    now = [0.0]
    monkeypatch.setattr(quantization, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def run(name: str, seconds: float):
        def call():
            calls[name] += 1
            now[0] += seconds

        return call

    return run


def test_an_instruction_set_clearly_slower_at_its_first_pass_is_timed_no_further(monkeypatch):
    """The kernel probes at load time every build once; one over twice the
    fastest's first pass (the generic build, seconds a pass at start) is not
    timed again, the others get their best of a few."""
    calls = {"fast": 0, "slow": 0}
    run = timed_calls(monkeypatch, calls)
    timed = best_seconds_each({0: run("fast", 0.001), 1: run("slow", 0.03)})
    assert min(timed, key=timed.get) == 0 and timed[1] >= 0.03
    assert calls == {"fast": 1 + _PROBE_PASSES, "slow": 2}  # warm-up and passes; warm-up and one pass


def test_a_build_slower_on_a_few_linears_is_never_timed_over_all_of_them(monkeypatch):
    """With screens (one layer's linears), the generic build's full pass,
    seconds at every start, does not run at all; the close ones still race."""
    calls = {"fast": 0, "close": 0, "slow": 0, "fast few": 0, "close few": 0, "slow few": 0}
    run = timed_calls(monkeypatch, calls)
    runs = {0: run("fast", 0.002), 1: run("close", 0.003), 2: run("slow", 0.05)}
    screens = {0: run("fast few", 0.001), 1: run("close few", 0.0012), 2: run("slow few", 0.01)}
    timed = best_seconds_each(runs, screens)
    assert timed[2] == float("inf") and calls["slow"] == 0 and calls["slow few"] == 2
    assert min(timed, key=timed.get) == 0 and calls["close"] == 1 + _PROBE_PASSES
    assert timings_text(timed, ["avx2", "avx2b", "generic"])["generic"] == "ruled out on a few linears"
