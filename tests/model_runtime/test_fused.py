"""The fused elementwise ops of eager CPU steps (``model_runtime.fused``):
each gives the model's own values, only what proves so is fused, and the
fused code runs only inside tokenstep's eager steps."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from model_runtime import kernels
from model_runtime.fused import FUSED_MARK, fuse_elementwise, fused_steps, within_rounding
from tests.tiny_models import TINY_DECODER


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.load()
    assert loaded is not None, "the kernels did not build here (a C++ compiler is on every machine of this project)"
    return loaded


def test_rms_norm_is_the_models_own_within_a_rounding(ops):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(67, eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(2, 5, 67) * 3
    with torch.inference_mode():
        torch.testing.assert_close(ops.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), rtol=2e-6, atol=1e-6)
        strided = x.transpose(0, 1)  # any layout in, contiguous out
        torch.testing.assert_close(ops.rms_norm(strided, norm.weight, 1e-5), norm(strided), rtol=2e-6, atol=1e-6)


def test_rotary_is_the_models_own_to_the_bit(ops):
    torch.manual_seed(0)
    # [B, heads, T, D] views of the projections' [B, T, heads, D], as Llama's attention hands them.
    q = torch.randn(1, 7, 4, 16).transpose(1, 2)
    k = torch.randn(1, 7, 2, 16).transpose(1, 2)
    angles = torch.randn(1, 7, 16) * 10
    cos, sin = angles.cos(), angles.sin()
    fused_q, fused_k = ops.rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(fused_q, want_q) and torch.equal(fused_k, want_k)
    assert fused_q.stride() == q.stride(), "laid out as the projection was"


def test_silu_mul_is_silu_times_up(ops):
    torch.manual_seed(0)
    gate, up = torch.randn(3, 100) * 8, torch.randn(3, 100)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, rtol=2e-6, atol=1e-7)


def test_the_merged_projections_ops_are_the_split_ones_to_the_bit(ops):
    """A merged query | key | value output rotated and split in one op, and a
    merged gate | up output through SiLU in one: the values of the split
    tensors through ``rotary`` and ``silu_mul``, in the same layouts."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 4 * 16 + 2 * 2 * 16) * 3  # 4 query heads, 2 key-value heads of 16
    angles = torch.randn(2, 7, 16) * 10
    cos, sin = angles.cos(), angles.sin()
    q, k, v = (part.view(2, 7, -1, 16).transpose(1, 2) for part in qkv.split([64, 32, 32], -1))
    want_q, want_k = ops.rotary(q, k, cos, sin)
    got_q, got_k, got_v = ops.qkv_rotary(qkv, cos, sin, 16, 64, 32)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k) and torch.equal(got_v, v)
    assert got_q.shape == (2, 4, 7, 16) and got_v.stride() == (7 * 2 * 16, 16, 2 * 16, 1), "[B, heads, T, D] laid out [B, T, heads, D]"
    assert got_q.stride() == (7 * 4 * 16, 16, 4 * 16, 1) and got_k.stride() == got_v.stride()
    with pytest.raises(RuntimeError, match="whole heads"):
        ops.qkv_rotary(qkv, cos, sin, 16, 48, 40)

    gate_up = torch.randn(3, 5, 200) * 8
    gate, up = gate_up.split([100, 100], -1)
    assert torch.equal(ops.silu_mul_halves(gate_up), ops.silu_mul(gate.contiguous(), up.contiguous()))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_DECODER, "vocab_size": 512})).eval()


def test_a_fused_model_gives_its_own_logits_and_runs_its_own_code_outside_steps(ops):
    model, reference = tiny_llama(), tiny_llama()
    described = fuse_elementwise(model, ops)
    assert described == (
        "5 RMSNorms, 2 SiLU MLPs, rotary embedding (modeling_llama) as one C++ op each; 2 decoder layers as one function each"
    ), described
    ids = torch.randint(0, 512, (1, 9))
    with torch.inference_mode():
        want = reference(ids).logits
        assert torch.equal(model(ids).logits, want), "outside fused_steps the model's own code runs"
        with fused_steps():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert getattr(modeling_llama.apply_rotary_pos_emb, FUSED_MARK) is not None
    assert fuse_elementwise(model, ops) == described, "fusing again changes nothing"


class OnePlusWeightRMSNorm(nn.Module):
    """Gemma's norm: the weight is stored minus one. Its shape qualifies; its values must not."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1.0 + self.weight)


class GeluMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(hidden, 8), nn.Linear(hidden, 8), nn.Linear(8, hidden)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_what_computes_something_else_keeps_its_own_code(ops, caplog):
    model = nn.Sequential(OnePlusWeightRMSNorm(16), GeluMLP(16))
    with caplog.at_level("INFO", logger="model_runtime.fused"):
        assert fuse_elementwise(model, ops) == "nothing fused"
    assert "1 SiLU MLPs of class GeluMLP keep their own code" in caplog.text, "a refused fusion is said in the start log"
    assert "1 RMSNorms of class OnePlusWeightRMSNorm keep their own code" in caplog.text
    assert not any(hasattr(module, FUSED_MARK) for module in model)
    x = torch.randn(2, 16)
    with torch.inference_mode(), fused_steps():
        assert torch.equal(model(x), model[1](model[0](x)))
        assert "forward" not in vars(model[0]) and "forward" not in vars(model[1]), "the class's own forward, not a fused one"


def test_the_engine_runs_its_eager_steps_fused_and_greedy_equals_generate(tiny_llama_dir):
    from batching.sampling_params import SamplingParams
    from server.engine_builder import EngineConfig, build_engine_core

    core = build_engine_core(EngineConfig(model=tiny_llama_dir, dtype="float32", device="cpu", kv_cache_memory="16MiB"))
    assert core.runner.model_step.fused, "eager CPU steps on the kernels run fused"
    prompt = [1, 300, 301, 302, 303]
    core.add_request(core.make_request("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    tokens = []
    while core.has_unfinished:
        tokens += [t for output in core.step() for t in output.new_token_ids]
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt) :]
    assert tokens == want.tolist()


def test_each_class_is_proved_apart_so_a_second_kind_of_norm_keeps_its_own_code(ops):
    """A model holding Llama's norm and one of other arithmetic: proving the
    first must not fuse the second (its fused values would be wrong)."""
    model = nn.Sequential(LlamaRMSNorm(16), OnePlusWeightRMSNorm(16))
    model[0].weight.data.normal_()
    assert fuse_elementwise(model, ops) == "1 RMSNorms as one C++ op each"
    assert hasattr(model[0], FUSED_MARK) and not hasattr(model[1], FUSED_MARK)
    x = torch.randn(2, 16)
    with torch.inference_mode(), fused_steps():
        assert torch.equal(model[1](x), OnePlusWeightRMSNorm.forward(model[1], x))


def test_only_layers_running_llamas_own_forwards_become_one_function(ops):
    """A layer that passes its attention more than Llama's does (a sliding window here)
    must keep its own code: the one-function layer would drop it, and the load-time
    proof runs too few positions to see a window bite."""

    class WindowedAttention(modeling_llama.LlamaAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, sliding_window=3, **kwargs)

    model, reference = tiny_llama(), tiny_llama()
    windowed = WindowedAttention(model.config, layer_idx=0)
    windowed.load_state_dict(model.model.layers[0].self_attn.state_dict())
    model.model.layers[0].self_attn = windowed
    assert fuse_elementwise(model, ops).endswith("; 1 decoder layers as one function each")
    assert not hasattr(model.model.layers[0], FUSED_MARK) and hasattr(model.model.layers[1], FUSED_MARK)
    ids = torch.randint(0, 512, (1, 9))
    with torch.inference_mode(), fused_steps():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**{**TINY_DECODER, "vocab_size": 512})).eval()
    assert "decoder layers" not in fuse_elementwise(mistral, ops)  # its own layer classes


def test_a_rounding_near_zero_is_within_rounding_other_arithmetic_is_not():
    """The check that proves a fused norm or MLP: an output near zero, the
    difference of large terms, moves by a rounding of those terms (GGUF
    Q4_K_M's first MLP on AVX2 did, and an element-wise tolerance refused
    the fused MLP and with it the whole-model op); a different function
    moves every output by a good part of itself."""
    want = torch.tensor([[116.44, -3.2e-4, 7.5], [0.02, -40.0, 1e-6]])
    rounded = want + torch.tensor([[3.05e-5, 2.0e-5, -1.0e-6], [1.5e-5, -3.0e-5, 2.0e-5]])
    assert not torch.allclose(rounded, want, rtol=1e-5, atol=1e-6), "an element-wise tolerance refuses it"
    assert within_rounding(rounded, want)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    assert not within_rounding(F.gelu(x), F.silu(x))
    assert not within_rounding(want * 1.001, want)
    assert not within_rounding(want[:1], want) and not within_rounding(want.clone().fill_(float("nan")), want)
    assert within_rounding(torch.empty(0, 3), torch.empty(0, 3))
