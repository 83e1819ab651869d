"""The CPU linear-layer layouts compute what ``nn.Linear`` computes."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from model_runtime.weights import layout as weight_layout
from model_runtime.weights import quantization
from model_runtime.weights.layout import (
    CHECKPOINT,
    FLOAT32_LAYOUTS,
    INPUT_MAJOR,
    LAYOUT_PROBE_ROWS,
    PACKED,
    PackedLinear,
    fastest_overall,
    free_unread_copies,
    has_native_bf16,
    optimise_cpu_linears,
)
from tests.tiny_models import TINY_DECODER


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


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_linear_matches_linear_in_float32_and_drops_an_unread_weight(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    x = torch.randn(1, rows, 96)
    packed = PackedLinear(linear)
    assert free_unread_copies(packed) == 0
    assert packed.checkpoint_weight is None, "nothing read it: the model holds the packed weight only"
    torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "times_ms, expected",
    [
        # Intel with AMX, 2026-12-07 (the default model, ms)
        (
            {CHECKPOINT: {1: 16.8, 16: 40.7, 64: 71.4}, INPUT_MAJOR: {1: 17.0, 16: 44.4, 64: 65.5}, PACKED: {1: 24.3, 16: 38.2, 64: 76.2}},
            CHECKPOINT,
        ),
        ({CHECKPOINT: {1: 37, 16: 80, 64: 190}, INPUT_MAJOR: {1: 35, 16: 89, 64: 190}, PACKED: {1: 25, 16: 49, 64: 109}}, PACKED),
        ({CHECKPOINT: {1: 30, 16: 90}, INPUT_MAJOR: {1: 20, 16: 60}, PACKED: {1: 40, 16: 55}}, INPUT_MAJOR),
        # each row count weighs alike: a 10 % loss on the long pass does not outweigh 30 % won on the short one
        ({CHECKPOINT: {1: 10, 64: 110}, INPUT_MAJOR: {1: 13, 64: 100}, PACKED: {1: 20, 64: 200}}, CHECKPOINT),
        ({CHECKPOINT: {1: 10}, INPUT_MAJOR: {1: 10}, PACKED: {1: 10}}, CHECKPOINT),  # a tie: no copy made
    ],
)
def test_the_layout_kept_is_the_fastest_relative_to_the_best_at_each_row_count(times_ms, expected):
    assert fastest_overall(times_ms) == expected


def tied_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_DECODER, "vocab_size": 128}, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("fastest", FLOAT32_LAYOUTS)
def test_one_layout_measured_on_the_models_own_linears_holds_each_weight_once(fastest, monkeypatch: pytest.MonkeyPatch):
    """The probe times each layout over the model's own linears at every
    probe row count (a scripted clock, advanced by each call, makes
    ``fastest`` win), the model keeps that layout alone with its values, and
    the tied LM head keeps the input embedding's tensor."""
    from model_runtime.loading.loader import held_bytes

    model = tied_llama()
    x = torch.randint(0, 128, (1, 9))
    with torch.inference_mode():
        expected = model(x).logits
    held_before = held_bytes(model)
    now_s = [0.0]
    calls: set[tuple[str, int]] = set()  # (layout, rows)
    forward_of = weight_layout._layout_forward

    def scripted(layout: str, is_tied_head: bool):
        kernel = forward_of(layout, is_tied_head)

        def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            calls.add((layout, x.shape[0]))
            now_s[0] += 1.0 if layout == fastest else 2.0
            return kernel(x, weight, bias)

        return forward

    monkeypatch.setattr(weight_layout, "_layout_forward", scripted)
    monkeypatch.setattr(quantization, "time", SimpleNamespace(perf_counter=lambda: now_s[0]))  # best_seconds' clock
    described = optimise_cpu_linears(model, torch.float32)
    assert calls == {(layout, rows) for layout in FLOAT32_LAYOUTS for rows in LAYOUT_PROBE_ROWS}
    assert f"15 linears {fastest}, the LM head keeps the tied input embedding's" in described

    free_unread_copies(model)  # what the loader does once the model's forward ran
    projection = model.model.layers[0].mlp.down_proj
    assert isinstance(projection, PackedLinear) == (fastest == PACKED)
    if fastest != PACKED:
        assert projection.weight.stride() == ((1, 64) if fastest == INPUT_MAJOR else (128, 1))  # [64, 128]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert held_bytes(model) == held_before, "one layout: every weight held once"
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)


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
    """Packed linears drop the checkpoint's weights, unless the model's code
    reads them (the weight stays, and the tokens are generate's); a
    quantized linear has no weight to read: refused at load, not a failure
    of every request."""
    from model_runtime.attention.check import UnsupportedModelError
    from model_runtime.loading.loader import load_model
    from tests.model_runtime.test_parity import build, generate_outputs, make_prompts, run_engine

    monkeypatch.setattr(weight_layout, "fastest_overall", lambda times_s: PACKED)
    loaded = load_model(tiny_llama_dir, "float32", "cpu")
    o_proj = loaded.model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, PackedLinear) and o_proj.checkpoint_weight is not None  # read, so kept
    assert loaded.model.model.layers[0].mlp.down_proj.checkpoint_weight is None  # nothing reads this one
    prompts = make_prompts(seed=3, vocab_size=loaded.vocab_size)[:4]
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert run_engine(build(loaded, num_kv_blocks=64), prompts) == generate_outputs(reference, prompts)
    with pytest.raises(UnsupportedModelError, match="its forward fails once tokenstep's linears stand in it \\(AttributeError"):
        load_model(tiny_llama_dir, "float32", "cpu", "int8")
