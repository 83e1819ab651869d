"""``--activations int16`` / ``int8``: the integer kernel against a float64
reference of the same arithmetic (every instruction-set build, ragged shapes,
4- and 8-bit codes, both activation widths), the layout, each row independent
of its batch, the modules built from the float-activation ones, tokens
unchanged by batching, chunking and preemption, the default model's agreement
with its float-activation self, and clear refusals."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_runtime import kernels
from model_runtime.loading.default_model import default_gguf_file
from model_runtime.loading.loader import load_model
from model_runtime.weights.gguf import load_gguf_linears
from model_runtime.weights.int_activations import (
    IntActivationLinear,
    pack_codes,
    quantize_activations,
    side_by_side,
    unpack_codes,
)
from model_runtime.weights.quantization import GROUP, GroupwiseLinear, Int4Linear, Int8Linear, pack_nibbles, unpack_nibbles
from tests.model_runtime.test_parity import build, make_prompts, run_engine
from tests.tiny_gguf import build_tiny_llama_gguf

ROWS = (1, 2, 7, 8, 9, 16, 17, 64)
SHAPES = ((32, 16), (70, 33), (576, 64), (96, 5))  # (in, out): K and N ragged against 32 and 16


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.load()
    assert loaded is not None, "the kernels did not build here (a C++ compiler is on every machine of this project)"
    return loaded


def random_codes(out_features: int, in_features: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = -(-in_features // 32)
    codes = torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.uint8)
    codes[0] = 2**bits - 1  # the largest code against the largest activations: no saturation anywhere
    return codes, torch.rand(out_features, groups) * 0.1 + 1e-3, torch.randn(out_features, groups) * 0.1


def reference_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, act_bits: int
) -> torch.Tensor:
    """What ``IntActivationLinear`` computes, in plain float64 PyTorch: x [M, K] quantized per group of 32 to ``act_bits`` with the
    kernel's rounding, unsigned ``codes`` [N, K], float ``scales`` and
    ``offsets`` [N, groups]."""
    m, k = x.shape
    groups = scales.shape[1]
    padded = nn.functional.pad(x.float(), (0, groups * GROUP - k)).reshape(m, groups, GROUP)
    d = padded.abs().amax(dim=2) / (2 ** (act_bits - 1) - 1)
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(padded * inverse[..., None])
    sx = d * xq.sum(dim=2)
    u = nn.functional.pad(codes.double(), (0, groups * GROUP - k)).reshape(codes.shape[0], groups, GROUP)
    dots = torch.einsum("mgi,ngi->mng", xq.double(), u)
    y = (dots * scales.double()[None] * d.double()[:, None]).sum(dim=2) + sx.double() @ offsets.double().t()
    return y if bias is None else y + bias.double()


def per_channel(per_tile: torch.Tensor, out_features: int) -> torch.Tensor:
    """Scales or offsets [tiles, groups, 16] back as [out_features, groups], float64."""
    return per_tile.permute(0, 2, 1).reshape(-1, per_tile.shape[1])[:out_features].double()


@pytest.mark.parametrize(("bits", "act_bits"), [(4, 16), (5, 16), (8, 16), (4, 8), (8, 8)])
def test_every_isa_matches_the_integer_arithmetic_in_float64(ops, bits: int, act_bits: int):
    torch.manual_seed(bits + act_bits)
    for in_features, out_features in SHAPES:
        if bits == 4 and in_features % 32:
            continue  # 4-bit weights come from GGUF blocks: whole groups
        codes, scales, offsets = random_codes(out_features, in_features, bits)
        bias = torch.randn(out_features)
        packed = pack_codes(codes, scales, offsets, bits, act_bits)
        stored_scales, stored_offsets = per_channel(packed[1], out_features), per_channel(packed[2], out_features)
        assert torch.equal(stored_scales, scales.half().double()) and torch.equal(stored_offsets, offsets.half().double())
        for rows in ROWS:
            x = torch.randn(rows, in_features) * 3
            x[0, :32] = torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0)  # every |xq| the largest, against the largest codes
            expected = reference_linear(x, codes, stored_scales, stored_offsets, bias, act_bits)
            for isa in range(len(ops.isas())):
                got = ops.int_linear(x, *packed, bias, bits, act_bits, out_features, isa)
                torch.testing.assert_close(
                    got.double(),
                    expected,
                    rtol=1e-5,
                    atol=1e-5 * expected.abs().max().item(),
                    msg=f"{ops.isas()[isa]} {rows}x{in_features}->{out_features}",
                )


def test_the_int8_layout_puts_a_lanes_codes_of_sixteen_channels_in_each_block():
    width = 16 * 4  # bytes of one 8-bit block: 4 codes a lane
    codes = torch.arange(32 * 64, dtype=torch.int32).reshape(32, 64).remainder(251).to(torch.uint8)  # [N=32, K=64]
    packed, _, _ = pack_codes(codes, torch.ones(32, 2), torch.zeros(32, 2), 8, 8)
    assert packed.shape == (2, 2, 512)  # 2 tiles of 16 channels, 2 groups, 8 blocks
    block = packed[1, 1, 3 * width : 4 * width].reshape(16, 4)  # tile 1, group 1, block 3
    assert torch.equal(block, codes[16:32, 32 + 3 * 4 : 32 + 4 * 4])
    nibbles = codes % 16
    packed4, _, _ = pack_codes(nibbles, torch.ones(32, 2), torch.zeros(32, 2), 4, 8)
    assert packed4.shape == (2, 2, 256)
    pair = packed4[0, 0, width : 2 * width]  # blocks 2 (low nibbles) and 3 (high)
    assert torch.equal((pair & 15).reshape(16, 4), nibbles[:16, 8:12])
    assert torch.equal((pair >> 4).reshape(16, 4), nibbles[:16, 12:16])


@pytest.mark.parametrize(("bits", "steps"), [(8, 8), (5, 6), (4, 4)])
def test_the_int16_layout_puts_pairs_of_a_channels_codes_in_each_half_of_a_word(bits: int, steps: int):
    pairs = 16 // bits  # pairs of codes in a 32-bit word; 16 pairs a group in `steps` words (5 bits: 3, 3, 3, 3, 3, 1)
    codes = torch.arange(32 * 64, dtype=torch.int32).reshape(32, 64).remainder(2**bits).to(torch.uint8)  # [N=32, K=64]
    codes = codes.roll(5, dims=1)  # no channel starts where its neighbour does
    packed, _, _ = pack_codes(codes, torch.ones(32, 2), torch.zeros(32, 2), bits, 16)
    assert packed.shape == (2, 2, steps * 16 * 4)  # 2 tiles, 2 groups, steps of 16 channels' 32-bit words
    words = packed.view(torch.int32).reshape(2, 2, steps, 16).to(torch.int64) & 0xFFFFFFFF
    for tile, group, step, channel, pair in [(1, 1, 1, 3, pairs - 1), (0, 1, 0, 15, 0), (1, 0, 15 // pairs, 0, 15 % pairs)]:
        word = words[tile, group, step, channel].item()
        k = group * 32 + 2 * (pairs * step + pair)  # the low half's code; the high half holds k + 1
        for half in (0, 1):
            assert (word >> (16 * half + bits * pair)) & (2**bits - 1) == codes[16 * tile + channel, k + half].item()
    if 16 % pairs:  # the last word's unused pairs are zero
        for half in (0, 1):
            assert ((words[:, :, -1] >> (16 * half)) & 0xFFFF).lt(2 ** (bits * (16 % pairs))).all()


@pytest.mark.parametrize("act_bits", [16, 8])
def test_a_rows_result_does_not_depend_on_its_batch(ops, act_bits: int):
    torch.manual_seed(2)
    codes, scales, offsets = random_codes(80, 96, 4)
    packed = pack_codes(codes, scales, offsets, 4, act_bits)
    x = torch.randn(19, 96)
    together = ops.int_linear(x, *packed, None, 4, act_bits, 80)
    for row in (0, 3, 4, 7, 8, 18):
        assert torch.equal(ops.int_linear(x[row : row + 1], *packed, None, 4, act_bits, 80)[0], together[row])
    assert ops.int_linear(x.reshape(19, 1, 96), *packed, None, 4, act_bits, 80).shape == (19, 1, 80)
    assert ops.int_linear(x[:0], *packed, None, 4, act_bits, 80).shape == (0, 80)


def test_the_op_refuses_bad_operands_clearly(ops):
    codes, scales, offsets = random_codes(32, 64, 4)
    packed = pack_codes(codes, scales, offsets, 4, 16)
    with pytest.raises(RuntimeError, match="x has 65 features"):
        ops.int_linear(torch.randn(2, 65), *packed, None, 4, 16, 32)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ops.int_linear(torch.randn(2, 64), *packed, None, 6, 16, 32)
    with pytest.raises(RuntimeError, match=r"bits must be 4 or 8 \(or 5 with 16-bit activations\), got 5"):
        ops.int_linear(torch.randn(2, 64), *packed, None, 5, 8, 32)
    with pytest.raises(RuntimeError, match="act_bits must be 8 or 16"):
        ops.int_linear(torch.randn(2, 64), *packed, None, 4, 4, 32)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8"):
        ops.int_linear(torch.randn(2, 64), *packed, None, 8, 16, 32)  # 4-bit codes read as 8-bit
    with pytest.raises(RuntimeError, match="scales and offsets must be contiguous float16"):
        ops.int_linear(torch.randn(2, 64), packed[0], packed[1].float(), packed[2], None, 4, 16, 32)
    with pytest.raises(RuntimeError, match="33 outputs do not fill 2 tiles"):
        ops.int_linear(torch.randn(2, 64), *packed, None, 4, 16, 33)


# |int-activation output - float-activation output| / max |output|: int16
# activations round 256 times finer than int8. 4-bit weights have float16
# scales (GGUF's); int8's float32 scales are stored in float16 too, a few 1e-4.
TOLERANCE = {(4, 16): 1e-4, (5, 16): 1e-4, (8, 16): 2e-3, (4, 8): 0.02, (5, 8): 0.02, (8, 8): 0.02}


@pytest.mark.parametrize("act_bits", [16, 8])
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_modules_from_the_float_activation_linears_stay_close_to_them(ops, bits: int, act_bits: int):
    """4-bit sources stay 4-bit codes; int8 q of 5 bits (GGUF's Q5_0: -16..15, float16 scales) become
    5-bit codes for int16 activations (8-bit ones for int8); other int8 q 8-bit codes."""
    torch.manual_seed(9)
    tolerance = TOLERANCE[bits, act_bits]
    scales = (torch.rand(40, 2) * 0.05).half().float()
    if bits == 4:
        offsets = (torch.randn(40, 2) * 0.05).half().float()
        source = Int4Linear(pack_nibbles(torch.randint(0, 16, (40, 64))), scales, offsets, torch.randn(40), ops, 64)
    elif bits == 5:
        q = torch.randint(-16, 16, (40, 64), dtype=torch.int8)
        q[0, 0], q[1, 1] = -16, 15
        source = Int8Linear(q, scales, torch.zeros(40, 2), torch.randn(40), ops, 64)
    else:
        source = Int8Linear.quantize(torch.randn(40, 70), torch.randn(40), ops)
    module = IntActivationLinear(source, ops, act_bits)
    assert module.bits == (8 if bits == 5 and act_bits == 8 else bits)
    x = torch.randn(5, source.in_features)
    float_activations = source.gemm_forward(x)
    got = module(x)
    # each activation off by up to half a step of its group's scale
    assert (got - float_activations).abs().max() < tolerance * float_activations.abs().max()
    assert not torch.equal(got, float_activations)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf-int-activations") / "tiny.gguf")


@pytest.mark.parametrize(("source", "activations"), [("gguf", "int16"), ("gguf", "int8"), ("int8", "int8")])
def test_tokens_do_not_depend_on_batching_chunking_or_preemption(source: str, activations: str, tiny_gguf: Path, tiny_llama_dir: Path):
    model = tiny_gguf if source == "gguf" else tiny_llama_dir
    loaded = load_model(model, "float32", "cpu", source, activations=activations)
    assert not any(isinstance(m, GroupwiseLinear) for m in loaded.model.modules())
    assert any(isinstance(m, IntActivationLinear) and m.bits == (4 if source == "gguf" else 8) for m in loaded.model.modules())
    prompts = make_prompts(seed=11, vocab_size=loaded.model.config.vocab_size)
    together = run_engine(build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096), prompts)
    assert run_engine(build(loaded, num_kv_blocks=40, max_num_batched_tokens=37), prompts, id_prefix="p") == together  # chunked, preempted
    alone = [
        run_engine(build(loaded, num_kv_blocks=512), [prompt], id_prefix=f"a{i}-", max_tokens_of=lambda _, i=i: len(together[i]))[0]
        for i, prompt in enumerate(prompts[:4])
    ]
    assert alone == together[:4]


@torch.inference_mode()
@pytest.mark.parametrize(("activations", "agreement", "logit_error"), [("int16", 1.0, 0.01), ("int8", 0.9, 2.0)])
def test_the_default_model_agrees_with_its_float_activation_self(
    default_model_dir: Path, activations: str, agreement: float, logit_error: float
):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()  # plain attention
    load_gguf_linears(model, default_gguf_file())
    prompt = torch.tensor([list(range(1000, 1064))])
    float_logits = model(prompt).logits[0]
    assert len(quantize_activations(model, kernels.load(), activations)) == 211  # every Q4_1 linear and the Q8_0 head
    logits = model(prompt).logits[0]
    assert (logits.argmax(-1) == float_logits.argmax(-1)).float().mean().item() >= agreement
    assert 0 < (logits - float_logits).abs().max().item() < logit_error


def test_integer_activations_need_quantized_weights(tiny_llama_dir: Path):
    with pytest.raises(
        ValueError, match="--activations int16 quantizes the inputs of quantized linears: use it with --quantization int8 or gguf"
    ):
        load_model(tiny_llama_dir, "float32", "cpu", "none", activations="int16")
    with pytest.raises(ValueError, match="unknown activations 'int4'"):
        load_model(tiny_llama_dir, "float32", "cpu", "int8", activations="int4")


def test_compiled_steps_give_the_eager_tokens_and_call_no_module_hooks(tiny_gguf: Path):
    """The linears are called without ``nn.Module.__call__`` (its hook machinery
    was ~10 % of a one-row step): eager and ``--compile`` both reach the op."""
    loaded = load_model(tiny_gguf, "float32", "cpu", "gguf", activations="int16")
    linear = next(m for m in loaded.model.modules() if isinstance(m, IntActivationLinear))
    calls = []
    handle = linear.register_forward_hook(lambda *_: calls.append(1))
    linear(torch.randn(2, linear.in_features))
    handle.remove()
    assert calls == []
    prompts = make_prompts(seed=5, vocab_size=loaded.model.config.vocab_size)[:4]
    eager = run_engine(build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096), prompts)
    compiled = build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096, compile=True)
    assert compiled.runner.compiled is not None
    assert run_engine(compiled, prompts, id_prefix="c") == eager


def int4_linear(ops, out_features: int, in_features: int = 64, act_bits: int = 16, bias: bool = False) -> IntActivationLinear:
    scales, offsets = (
        (torch.rand(out_features, in_features // 32) * 0.05).half().float(),
        (torch.randn(out_features, in_features // 32) * 0.05).half().float(),
    )
    codes = pack_nibbles(torch.randint(0, 16, (out_features, in_features)))
    source = Int4Linear(codes, scales, offsets, torch.randn(out_features) if bias else None, ops, in_features)
    module = IntActivationLinear(source, ops, act_bits)
    module.isa = -1
    return module


@pytest.mark.parametrize("bias", [False, True])  # Llama's attention_bias, Qwen2's
def test_projections_side_by_side_give_each_ones_outputs_from_one_copy_of_the_weights(ops, bias: bool):
    """Query, key and value (or gate and up) read one input: merged, one call
    gives each one's outputs to the bit, and the three keep computing theirs
    from views of the merged weights (nothing held twice)."""
    torch.manual_seed(4)
    projections = [int4_linear(ops, n, bias=bias) for n in (64, 32, 32)]
    x = torch.randn(5, 64)
    expected = [p(x) for p in projections]
    merged = side_by_side(projections)
    assert merged is not None and merged.split_sizes == [64, 32, 32]
    for rows in (1, 5):
        assert all(torch.equal(got, want[:rows]) for got, want in zip(merged(x[:rows]).split(merged.split_sizes, -1), expected))
    storage = merged.codes.untyped_storage().data_ptr()
    assert all(p.codes.untyped_storage().data_ptr() == storage for p in projections)
    assert all(torch.equal(p(x), want) for p, want in zip(projections, expected))


@pytest.mark.parametrize("narrow", [5, 4])
def test_narrower_projections_beside_an_eight_bit_one_widen_to_share_its_call(ops, narrow: int):
    """GGUF's Q4_K_M gives a 576-wide model Q5_0 queries and keys but, in some layers, a Q8_0 value (and a
    Q4_0 / Q4_1 file may hold a Q8_0 value beside 4-bit queries and keys): the narrower codes are repacked
    as 8-bit ones (exactly the same codes) so the three still share one call, each output the same to the
    bit as before."""
    torch.manual_seed(6)
    scales = (torch.rand(32, 2) * 0.05).half().float()
    if narrow == 5:
        sources = [Int8Linear(torch.randint(-16, 16, (32, 64), dtype=torch.int8), scales, torch.zeros(32, 2), None, ops, 64) for _ in "qk"]
    else:
        sources = [Int4Linear(pack_nibbles(torch.randint(0, 16, (32, 64))), scales, scales * -8, None, ops, 64) for _ in "qk"]
    eight = Int8Linear(torch.randint(-128, 128, (32, 64), dtype=torch.int8), scales, torch.zeros(32, 2), None, ops, 64)
    projections = [IntActivationLinear(source, ops, 16) for source in [*sources, eight]]
    assert [p.bits for p in projections] == [narrow, narrow, 8]
    codes = unpack_codes(projections[0].codes, narrow, 32, 64)
    assert torch.equal(codes, (sources[0].q.to(torch.int16) + 16).to(torch.uint8) if narrow == 5 else unpack_nibbles(sources[0].q))
    x = torch.randn(3, 64)
    expected = [p(x) for p in projections]
    merged = side_by_side(projections)
    assert merged is not None and merged.bits == 8 and [p.bits for p in projections] == [8, 8, 8]
    assert torch.equal(merged(x), torch.cat(expected, -1))
    assert torch.equal(unpack_codes(projections[0].codes, 8, 32, 64), codes)


def test_projections_of_mixed_widths_that_cannot_share_a_call_are_not_widened(ops):
    torch.manual_seed(7)
    scales = (torch.rand(32, 2) * 0.05).half().float()
    five = IntActivationLinear(
        Int8Linear(torch.randint(-16, 16, (32, 64), dtype=torch.int8), scales, torch.zeros(32, 2), None, ops, 64), ops, 16
    )
    assert side_by_side([five, int4_linear(ops, 32, in_features=96)]) is None
    assert five.bits == 5


def test_projections_that_cannot_share_a_call_keep_their_own(ops):
    torch.manual_seed(5)
    assert side_by_side([int4_linear(ops, 32), int4_linear(ops, 40)]) is None  # 40 outputs: a part-filled tile
    assert side_by_side([int4_linear(ops, 32), int4_linear(ops, 32, in_features=96)]) is None
    assert side_by_side([int4_linear(ops, 32), int4_linear(ops, 32, act_bits=8)]) is None
    assert side_by_side([int4_linear(ops, 32), int4_linear(ops, 32, bias=True)]) is None
    assert side_by_side([int4_linear(ops, 32), nn.Linear(64, 32)]) is None
    assert side_by_side([int4_linear(ops, 32)]) is None


def test_merged_projections_change_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The engine's fused eager steps call each layer's query, key and value
    projections, and its gate and up, as one linear each: the same tokens
    as with one call per projection, through chunking and preemption. (The
    4-bit Q4_0 and Q4_1 mix in one call.)"""
    from model_runtime import fused
    from tests.tiny_gguf import TYPES

    tiny_gguf = build_tiny_llama_gguf(tmp_path / "tiny.gguf", {**TYPES, "attn_v": "Q4_1"})

    def tokens(merge: bool) -> tuple[list[list[int]], str]:
        if not merge:
            monkeypatch.setattr(fused, "side_by_side", lambda linears: None)
        loaded = load_model(tiny_gguf, "float32", "cpu", "gguf", activations="int16")
        prompts = make_prompts(seed=12, vocab_size=loaded.vocab_size)[:6]
        core = build(loaded, num_kv_blocks=40, max_num_batched_tokens=37)
        return run_engine(core, prompts), fused.fuse_elementwise(loaded.model, kernels.load())

    merged_tokens, described = tokens(merge=True)
    assert described.endswith("4 groups of projections that read one input in one call each")  # 2 layers x (qkv, gate-up)
    separate_tokens, described = tokens(merge=False)
    assert "groups of projections" not in described
    assert merged_tokens == separate_tokens


@pytest.mark.parametrize("source", ["gguf", "biased int8", "gguf Q6_K down"])
def test_whole_layers_in_one_op_give_the_python_layers_logits_to_the_bit(
    source: str, tmp_path: Path, default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Where every piece of a fused Llama layer has its C++ form, an eager
    step runs the layer as one op (tokenstep::llama_layers), and where every
    layer of the model has, all of them as one op: every logit of every step,
    through chunked prefills, preemption and mixed steps, equals the Python
    layers' to the bit either way: 4-bit GGUF blocks; 8-bit codes with every
    projection biased (attention_bias, mlp_bias) and every norm its own
    weights; and a Q4_K_M-like file
    whose down projection is Q6_K, on float activations, and whose Q5_0
    projections are 5-bit codes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_runtime import fused
    from model_runtime.sampler import Sampler
    from tests.tiny_gguf import TYPES
    from tests.tiny_models import TINY_DECODER

    if source == "gguf":
        model, quantization = build_tiny_llama_gguf(tmp_path / "tiny.gguf", {**TYPES, "attn_v": "Q4_1", "ffn_down": "Q4_0"}), "gguf"
    elif source == "gguf Q6_K down":  # as llama-quantize's Q4_K_M makes of a model 576 wide: Q5_0, Q8_0 and Q6_K
        types = {name: "Q5_0" for name in TYPES} | {"attn_v": "Q8_0", "ffn_down": "Q6_K"}
        model, quantization = build_tiny_llama_gguf(tmp_path / "tiny.gguf", types, width=256), "gguf"
    else:
        torch.manual_seed(5)
        biased = LlamaForCausalLM(LlamaConfig(**TINY_DECODER, attention_bias=True, mlp_bias=True)).eval()
        for name, parameter in biased.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(parameter, std=0.5)  # not the zeros they start as
            elif "norm" in name:
                torch.nn.init.normal_(parameter, mean=1.0, std=0.5)  # each norm its own weights, not ones
        model, quantization = tmp_path / "biased", "int8"
        biased.save_pretrained(model)
        AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(model)
    real_sample, calls = Sampler.sample, []

    def recording_sample(self, logits, rows):
        calls.append(logits.clone())
        return real_sample(self, logits, rows)

    monkeypatch.setattr(Sampler, "sample", recording_sample)
    ops, layer_calls = kernels.load(), []
    real_op = ops.llama_layers
    monkeypatch.setattr(ops, "llama_layers", lambda *args: layer_calls.append(len(args[7])) or real_op(*args))
    said = {
        "each": "2 decoder layers as one C++ op each where the step's attention is tokenstep's C++ op",
        "all": "all 2 decoder layers as one C++ op where the step's attention is tokenstep's C++ op",
    }

    def logits(layers: str) -> tuple[list[torch.Tensor], list[list[int]], list[int]]:
        calls.clear(), layer_calls.clear()
        with monkeypatch.context() as patch:
            if layers == "python":
                patch.setattr(fused._NativeLayer, "of", classmethod(lambda cls, layer, qkv: None))
            if layers != "all":
                patch.setattr(fused, "_fuse_llama_model", lambda model, ops: 0)
            loaded = load_model(model, "float32", "cpu", quantization, activations="int16")
            if source == "gguf Q6_K down":  # Q5_0 as 5-bit codes, Q8_0 as 8-bit ones
                assert {m.bits for m in loaded.model.modules() if isinstance(m, IntActivationLinear)} == {5, 8}
            prompts = make_prompts(seed=13, vocab_size=loaded.vocab_size)[:6]
            core = build(loaded, num_kv_blocks=40, max_num_batched_tokens=37)
            described = fused.fuse_elementwise(loaded.model, ops)  # what the engine's build fused, said again
            assert described.endswith(said[layers]) if layers in said else "decoder layers as one C++ op" not in described
            return list(calls), run_engine(core, prompts), list(layer_calls)

    python_logits, python_tokens, python_calls = logits("python")
    assert python_calls == []
    for layers in ("each", "all"):
        native_logits, native_tokens, native_calls = logits(layers)
        assert native_calls and set(native_calls) == {1 if layers == "each" else 2}
        assert native_tokens == python_tokens
        assert len(native_logits) == len(python_logits)
        assert all(torch.equal(a, b) for a, b in zip(native_logits, python_logits, strict=True))
