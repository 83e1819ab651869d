"""The CPU linear-layer layouts compute what ``nn.Linear`` computes."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from model_runtime.weights import layout as weight_layout
from model_runtime.weights.layout import (
    PACKED_FROM_ROWS,
    PROBE_ROWS,
    PackedLinear,
    RowSwitchedLinear,
    choose_packed_from_rows,
    free_unread_copies,
    has_native_bf16,
    optimise_cpu_linears,
    packed_from_rows_given,
)


@pytest.mark.skipif(
    not has_native_bf16(),
    reason="oneDNN packs bf16 weights only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; optimise_cpu_linears "
    "uses PackedLinear only where has_native_bf16() (test_parity checks that), so an AVX2-only host never builds one",
)
@pytest.mark.parametrize("rows", [1, 7, 16, 64])
def test_packed_linear_matches_linear_in_bf16(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    expected = linear(x).float()
    got = PackedLinear(linear)(x).float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("packed_from_rows", [1, 2, PACKED_FROM_ROWS])
@pytest.mark.parametrize("rows", [1, PACKED_FROM_ROWS - 1, PACKED_FROM_ROWS, 64])
def test_row_switched_linear_matches_linear_in_float32_on_both_paths(rows, packed_from_rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    x = torch.randn(1, rows, 96)
    switched = RowSwitchedLinear(linear)
    switched.use_packed_from(packed_from_rows)
    free_unread_copies(switched)
    assert (switched.input_major_weight is None) == (packed_from_rows == 1), "packed from one row on: the [in, out] copy is freed"
    torch.testing.assert_close(switched(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "packed_wins_at, expected",
    [
        ({1, 2, 4}, 1),  # packed faster everywhere: from one row
        ({2, 4}, 2),
        ({4}, 4),
        ({1, 2}, PACKED_FROM_ROWS),  # MKL wins at the largest probe: keep the default
        (set(), PACKED_FROM_ROWS),
        ({1, 4}, 4),  # a win below a loss does not count: packed must win at every larger probe
    ],
)
def test_the_switch_row_is_the_smallest_probe_from_which_packed_always_wins(packed_wins_at, expected):
    timed: list[int] = []

    def best_s(rows: int) -> tuple[float, float]:
        timed.append(rows)
        return (1.0, 2.0) if rows in packed_wins_at else (2.0, 1.0)

    assert packed_from_rows_given(best_s) == expected
    assert timed == sorted(timed, reverse=True)  # largest probe first


def test_the_switch_row_is_measured_on_real_linears(monkeypatch: pytest.MonkeyPatch):
    """The probe times passes over these linears' own two kernels at each probe
    row (a scripted clock, advanced by each call, makes packed win from 2 rows
    on), picks the row those times give, and the switched linears still
    compute nn.Linear's values on both sides of it."""
    torch.manual_seed(0)
    references = [nn.Linear(64, 256) for _ in range(4)]
    expected_weights = [(linear.weight.detach().clone(), linear.bias.detach().clone()) for linear in references]
    linears = [RowSwitchedLinear(linear) for linear in references]
    now_s = [0.0]
    calls: set[tuple[int, int, bool]] = set()  # (linear, rows, packed)

    def timed(index: int, kernel, is_packed: bool):
        def forward(x: torch.Tensor) -> torch.Tensor:
            calls.add((index, x.shape[0], is_packed))
            now_s[0] += 1.0 if is_packed == (x.shape[0] >= 2) else 2.0
            return kernel(x)

        return forward

    for index, module in enumerate(linears):
        module.packed_forward = timed(index, module.packed_forward, True)
        module.mkl_forward = timed(index, module.mkl_forward, False)
    monkeypatch.setattr(weight_layout, "time", SimpleNamespace(perf_counter=lambda: now_s[0]))
    rows = choose_packed_from_rows(linears)
    assert rows == 2
    assert calls == {(index, probe, is_packed) for index in range(4) for probe in PROBE_ROWS for is_packed in (True, False)}

    for module, (weight, bias) in zip(linears, expected_weights):
        del module.packed_forward, module.mkl_forward
        module.use_packed_from(rows)
        for num_rows in (1, rows, rows + 3):
            x = torch.randn(num_rows, 64)
            torch.testing.assert_close(module(x), nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_float32_model_gets_row_switched_linears_with_the_same_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 8)
    before = model(x)
    assert "measured at load" in optimise_cpu_linears(model, torch.float32)
    assert all(isinstance(m, RowSwitchedLinear) for m in (model[0], model[2]))
    assert model[0].packed_from_rows == model[2].packed_from_rows
    torch.testing.assert_close(model(x), before)


@pytest.fixture
def layers_read_a_projection_weight(monkeypatch: pytest.MonkeyPatch):
    """Llama's decoder layers made to read ``o_proj.weight.dtype`` before
    attending, as Ergo's do: model code reading a weight outside its linear."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaDecoderLayer.forward

    def reading_forward(self, hidden_states, *args, **kwargs):
        hidden_states = hidden_states.to(self.self_attn.o_proj.weight.dtype)
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", reading_forward)


def test_a_weight_the_models_code_reads_is_kept_and_a_linear_without_one_is_refused_at_load(
    tiny_llama_dir, layers_read_a_projection_weight, monkeypatch: pytest.MonkeyPatch
):
    """Packing from one row frees the [in, out] copies, unless the model's
    code reads them (the copy stays, and the tokens are generate's); a
    quantized linear has no weight to read: refused at load, not a failure
    of every request."""
    from model_runtime.attention.check import UnsupportedModelError
    from model_runtime.loading.loader import load_model
    from tests.model_runtime.test_parity import build, generate_outputs, make_prompts, run_engine

    monkeypatch.setattr(weight_layout, "choose_packed_from_rows", lambda linears: 1)
    loaded = load_model(tiny_llama_dir, "float32", "cpu")
    o_proj = loaded.model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, RowSwitchedLinear) and o_proj.input_major_weight is not None  # read, so kept
    assert loaded.model.model.layers[0].mlp.down_proj.input_major_weight is None  # nothing reads this one
    prompts = make_prompts(seed=3, vocab_size=loaded.vocab_size)[:4]
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert run_engine(build(loaded, num_kv_blocks=64), prompts) == generate_outputs(reference, prompts)
    with pytest.raises(UnsupportedModelError, match="its forward fails once tokenstep's linears stand in it \\(AttributeError"):
        load_model(tiny_llama_dir, "float32", "cpu", "int8")
