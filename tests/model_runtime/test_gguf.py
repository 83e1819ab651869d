"""``--quantization gguf``: GGUF blocks decoded as gguf itself decodes them,
the file index read as gguf's reader reads it, the 4-bit kernel against the
dequantized GEMM (every instruction set), the served weights equal to the
file's values (rows un-permuted, a tied head from the embedding), greedy
parity with ``generate`` on the model transformers loads from the same file,
and clear refusals."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from model_runtime import kernels, paths
from model_runtime.loading.default_model import DEFAULT_MODEL_NAME, GGUF_FILE, convert_gguf, default_gguf_file
from model_runtime.loading.loader import load_model
from model_runtime.weights import quantization
from model_runtime.weights.gguf import BLOCK_SHAPES, BlockEmbedding, decode_blocks, read_gguf
from model_runtime.weights.int_activations import IntActivationLinear
from model_runtime.weights.quantization import GroupwiseLinear, Int4Linear, Int8Linear, dequantize_groups, pack_nibbles, unpack_nibbles
from tests.model_runtime.test_parity import build, generate_outputs, make_prompts, run_engine
from tests.tiny_gguf import K_EMBEDDING_TYPE, K_TYPES, TYPES, build_tiny_llama_gguf, quantize_k, quantize_q6_k

ROWS = (1, 2, 5, 6, 7, 16, 64, 65, 130)
SHAPES = ((32, 1), (64, 7), (96, 16), (576, 33))  # (in, out)


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.load()
    assert loaded is not None, "the kernels did not build here (a C++ compiler is on every machine of this project)"
    return loaded


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_k_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q4_K, Q5_K, Q5_0, Q5_1 and Q6_K projections, a Q4_K embedding the head is tied to."""
    return build_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-k-gguf") / "tiny-k.gguf", K_TYPES, K_EMBEDDING_TYPE, width=256)


def random_int4(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = pack_nibbles(torch.randint(0, 16, (out_features, in_features)))
    scales = torch.rand(out_features, in_features // 32) * 0.1 + 0.01
    return packed, scales, torch.randn(out_features, in_features // 32) * 0.1


def from_file(path: Path) -> nn.Module:
    """The float32 model transformers makes from the file (its own dequantization)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_decode_to_ggufs_own_values(type_name: str):
    import gguf

    weights = (np.random.default_rng(0).standard_normal((6, 96)) * np.logspace(-2, 1, 6)[:, None]).astype(np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[type_name])
    blocks = decode_blocks(raw, type_name)
    assert blocks.int4 == (type_name != "Q8_0") and blocks.scales.shape == (6, 3)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
    torch.testing.assert_close(blocks.dequantized(), expected, rtol=1e-6, atol=1e-7)
    assert decode_blocks(weights.astype(np.float16).view(np.uint8), "F16") is None


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_random_valid_blocks_decode_to_ggufs_own_values(type_name: str):
    """Every bit pattern of the block bodies (random bytes), finite float16 scales and minimums."""
    import gguf

    rng = np.random.default_rng(3)
    weights_per_block, block_bytes = BLOCK_SHAPES[type_name]
    raw = rng.integers(0, 256, (7, 512 // weights_per_block * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(7, -1, block_bytes)
    # d (and m or dmin) lead each block; Q6_K's d ends it
    starts = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(type_name, (0,))
    for start in starts:
        factors = rng.uniform(-0.05, 0.05, (*blocks.shape[:2], 1)).astype(np.float16)
        blocks[:, :, start : start + 2] = factors.view(np.uint8)
    decoded = decode_blocks(raw, type_name)
    assert decoded.int4 == (type_name in ("Q4_0", "Q4_1", "Q4_K")) and decoded.scales.shape == (7, 32 if type_name == "Q6_K" else 16)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
    torch.testing.assert_close(decoded.dequantized(), expected, rtol=1e-6, atol=1e-7)


def test_the_k_quantizer_of_the_fixtures_writes_what_gguf_reads():
    import gguf

    weights = (np.random.default_rng(1).standard_normal((6, 512)) * 0.2).astype(np.float32)
    for type_name, step in (("Q4_K", 15), ("Q5_K", 31)):
        raw = quantize_k(weights, type_name)
        assert raw.shape == (6, 2 * BLOCK_SHAPES[type_name][1])
        restored = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
        assert np.abs(restored - weights).max() < 2 * np.ptp(weights) / step / 2  # within a step of each group's range
    restored = gguf.quants.dequantize(quantize_q6_k(weights), gguf.GGMLQuantizationType.Q6_K)
    assert np.abs(restored - weights).max() < np.abs(weights).max() / 31


def test_nibbles_pack_in_ggufs_order():
    values = torch.randint(0, 16, (3, 64))
    packed = pack_nibbles(values)
    assert packed.shape == (3, 32) and torch.equal(unpack_nibbles(packed), values)
    assert packed[0, 0] == values[0, 0] | (values[0, 16] << 4)  # byte i: weight i low, weight i + 16 high


def test_file_index_matches_ggufs_reader(tiny_gguf: Path):
    from gguf import GGUFReader

    metadata, tensors = read_gguf(tiny_gguf)
    assert metadata["general.architecture"] == "llama" and metadata["llama.block_count"] == 2
    reference = GGUFReader(str(tiny_gguf)).tensors
    assert [(t.name, t.type_name) for t in tensors] == [(t.name, t.tensor_type.name) for t in reference]
    for mine, theirs in zip(tensors, reference):
        assert np.array_equal(mine.data.reshape(-1), np.asarray(theirs.data).view(np.uint8).reshape(-1)), mine.name
    with pytest.raises(ValueError, match="is not a GGUF file"):
        read_gguf(Path(__file__))


def test_int4_kernel_on_every_isa_matches_the_dequantized_gemm(ops):
    torch.manual_seed(0)
    for in_features, out_features in SHAPES:
        packed, scales, offsets = random_int4(out_features, in_features)
        weight = dequantize_groups(unpack_nibbles(packed), scales, offsets).double()
        bias = torch.randn(out_features)
        for isa in range(len(ops.isas())):
            torch.testing.assert_close(ops.int4_dequantize(packed, scales, offsets, isa).double(), weight, rtol=1e-6, atol=1e-6)
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                for with_bias in (True, False):
                    expected = nn.functional.linear(x.double(), weight, bias.double() if with_bias else None)
                    got = ops.int4_linear(x, packed, scales, offsets, bias if with_bias else None, isa)
                    torch.testing.assert_close(
                        got.double(),
                        expected,
                        rtol=1e-4,
                        atol=1e-4 * in_features**0.5,
                        msg=f"{ops.isas()[isa]} {rows}x{in_features}->{out_features}",
                    )


def test_int8_kernel_with_groups_of_16_on_every_isa_matches_the_dequantized_gemm(ops):
    """GGUF's Q6_K holds a scale per 16 weights: the int8 kernel takes [N, K / 16] scales too."""
    torch.manual_seed(1)
    for in_features, out_features in ((32, 1), (64, 7), (96, 16), (576, 33), (272, 5)):
        q = torch.randint(-32, 32, (out_features, in_features), dtype=torch.int8)
        scales = torch.randn(out_features, in_features // 16) * 0.05
        offsets = torch.zeros_like(scales)
        index = torch.arange(in_features) // 16
        weight = q.double() * scales.double()[:, index]
        torch.testing.assert_close(dequantize_groups(q, scales, offsets).double(), weight, rtol=1e-6, atol=1e-7)
        for isa in range(len(ops.isas())):
            torch.testing.assert_close(ops.int8_dequantize(q, scales, offsets, isa).double(), weight, rtol=1e-6, atol=1e-7)
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                got = ops.int8_linear(x, q, scales, offsets, None, isa)
                expected = nn.functional.linear(x.double(), weight)
                torch.testing.assert_close(
                    got.double(), expected, rtol=1e-4, atol=1e-4 * in_features**0.5, msg=f"{ops.isas()[isa]} {rows}x{in_features}"
                )


def test_int4_kernel_refuses_bad_operands_clearly(ops):
    packed, scales, offsets = random_int4(8, 64)
    with pytest.raises(RuntimeError, match="q must be contiguous uint8"):
        ops.int4_linear(torch.randn(2, 64), packed.view(torch.int8), scales, offsets, None)
    with pytest.raises(RuntimeError, match="K must be a multiple of 32, got 48"):
        ops.int4_linear(torch.randn(2, 48), packed[:, :24].contiguous(), scales[:, :2].contiguous(), offsets[:, :2].contiguous(), None)
    with pytest.raises(RuntimeError, match="x has 63 features, the weight 64"):
        ops.int4_linear(torch.randn(2, 63), packed, scales, offsets, None)


def test_int4_module_without_kernels_gives_the_same_values(ops):
    packed, scales, offsets = random_int4(40, 96)
    bias = torch.randn(40)
    with_kernel, without = Int4Linear(packed, scales, offsets, bias, ops, 96), Int4Linear(packed, scales, offsets, bias, None, 96)
    for rows in (1, 9, 300):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(with_kernel(x), without(x), rtol=1e-4, atol=1e-4)


def served_kinds(path: Path) -> tuple[nn.Module, dict[str, tuple[str, str] | str]]:
    """The model ``--quantization gguf`` serves from ``path``, and each
    linear's (GGUF type, kernel kind), or "float"; every served linear's
    values checked equal to the float32 weight transformers makes of the file."""
    plain = from_file(path)
    served = load_model(path, "float32", "cpu", "gguf").model
    float_weights = {name: module.weight for name, module in plain.named_modules() if isinstance(module, nn.Linear)}
    kinds = {}
    for name, module in served.named_modules():
        if isinstance(module, GroupwiseLinear):
            torch.testing.assert_close(module.dequantized(), float_weights[name].detach(), rtol=0, atol=1e-6, msg=name)
            kinds[name] = (module.gguf_type, module.KIND)
        elif isinstance(module, nn.Linear):
            kinds[name] = "float"
    return served, kinds


def test_gguf_serves_the_files_own_values(tiny_gguf: Path):
    served, found = served_kinds(tiny_gguf)
    kinds = {name: kind if kind == "float" else kind[1] for name, kind in found.items()}
    assert kinds["model.layers.1.self_attn.q_proj"] == "int4" and kinds["model.layers.1.self_attn.k_proj"] == "int4"  # permuted rows
    assert kinds["model.layers.1.self_attn.v_proj"] == "int8" and kinds["model.layers.0.mlp.down_proj"] == "float"  # Q8_0, F16
    assert TYPES["ffn_down"] == "F16" and kinds["lm_head"] == "int8"  # tied to the Q8_0 embedding
    assert isinstance(served.lm_head, Int8Linear) and isinstance(served.get_input_embeddings(), BlockEmbedding)


def test_gguf_greedy_parity_with_generate_on_the_files_model(tiny_gguf: Path):
    loaded = load_model(tiny_gguf, "float32", "cpu", "gguf")
    reference_model = from_file(tiny_gguf)
    prompts = make_prompts(seed=5, vocab_size=loaded.model.config.vocab_size)
    expected = generate_outputs(reference_model, prompts)
    assert run_engine(build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096), prompts) == expected
    assert run_engine(build(loaded, num_kv_blocks=40, max_num_batched_tokens=37), prompts, id_prefix="p") == expected  # chunked, preempted


def test_k_quants_and_5_bit_types_serve_the_files_own_values_in_their_own_blocks(tiny_k_gguf: Path):
    served, kinds = served_kinds(tiny_k_gguf)
    attention, mlp = "model.layers.1.self_attn.", "model.layers.0.mlp."
    assert kinds[attention + "q_proj"] == ("Q4_K", "int4") and kinds[attention + "k_proj"] == ("Q5_K", "int8")  # permuted rows
    assert kinds[attention + "v_proj"] == ("Q5_0", "int8") and kinds[attention + "o_proj"] == ("Q5_1", "int8")
    assert kinds[mlp + "gate_proj"] == ("Q4_K", "int4") and kinds[mlp + "up_proj"] == ("Q5_K", "int8")
    assert kinds[mlp + "down_proj"] == ("Q6_K", "int8") and kinds["lm_head"] == ("Q4_K", "int4")  # tied to the Q4_K embedding
    assert served.model.layers[0].mlp.down_proj.group == 16 and "float" not in kinds.values()
    # Q4_K holds two weights a byte, as the file does, beside a float32 scale and offset per 32.
    assert served.model.layers[0].self_attn.q_proj.q.element_size() * served.model.layers[0].self_attn.q_proj.q.shape[1] == 256 // 2


def test_k_quants_greedy_parity_with_generate_on_the_files_model(tiny_k_gguf: Path):
    loaded = load_model(tiny_k_gguf, "float32", "cpu", "gguf")
    prompts = make_prompts(seed=7, vocab_size=loaded.model.config.vocab_size)
    expected = generate_outputs(from_file(tiny_k_gguf), prompts)
    assert run_engine(build(loaded, num_kv_blocks=512, max_num_batched_tokens=4096), prompts) == expected
    assert run_engine(build(loaded, num_kv_blocks=40, max_num_batched_tokens=37), prompts, id_prefix="p") == expected  # chunked, preempted


def test_k_quants_with_integer_activations_stay_close_to_the_files_weights(tiny_k_gguf: Path):
    """int16 activations round each group's inputs (and the kernel's layout
    holds scales and offsets in float16): each linear close to the file's
    float weights, not equal. Q6_K (groups of 16) keeps float activations."""
    model = load_model(tiny_k_gguf, "float32", "cpu", "gguf", activations="int16").model
    reference = from_file(tiny_k_gguf)
    float_weights = {name: module.weight.detach() for name, module in reference.named_modules() if isinstance(module, nn.Linear)}
    replaced = {name: module for name, module in model.named_modules() if isinstance(module, IntActivationLinear)}
    attention = "model.layers.0.self_attn."
    assert {attention + "q_proj", attention + "k_proj", attention + "v_proj", attention + "o_proj", "lm_head"} <= set(replaced)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)  # Q6_K's groups of 16 keep float activations
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    for name, module in replaced.items():
        inputs = x if module.in_features == 256 else torch.randn(5, module.in_features)
        want = inputs @ float_weights[name].T
        torch.testing.assert_close(module(inputs), want, rtol=0, atol=2e-3 * want.abs().max().item(), msg=name)


@pytest.mark.skipif(kernels.load() is None, reason="tokenstep's CPU kernels did not build here")
def test_float_activation_kernels_are_timed_only_for_the_linears_that_keep_float_activations(
    tiny_gguf: Path, tiny_k_gguf: Path, monkeypatch
):
    """Integer activations replace a linear's kernel: timing its float one too cost about a second of every start."""
    timed = []
    choose = quantization.choose_kernels
    monkeypatch.setattr(quantization, "choose_kernels", lambda linears, *rest: timed.append(linears) or choose(linears, *rest))
    load_model(tiny_gguf, "float32", "cpu", "gguf", activations="int16")
    assert timed == []
    model = load_model(tiny_k_gguf, "float32", "cpu", "gguf", activations="int16").model
    (kept,) = timed  # Q6_K's groups of 16, one down_proj a layer
    assert kept == [layer.mlp.down_proj for layer in model.model.layers] and all(m.isa >= 0 for m in kept)
    timed.clear()
    model = load_model(tiny_gguf, "float32", "cpu", "gguf", activations="float32").model
    (every,) = timed
    assert every == [m for m in model.modules() if isinstance(m, GroupwiseLinear)] and len(every) > 1


def test_loading_a_gguf_file_builds_ggufs_name_map_once_per_use(tiny_gguf: Path, monkeypatch):
    """transformers builds it for every module it walks (398 times, 7 s, for the default model's Q4_K_M)."""
    import gguf

    built = []
    make = gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *key: built.append(key) or make(*key))
    loaded = load_model(tiny_gguf, "float32", "cpu", "gguf")
    layers = loaded.model.config.num_hidden_layers
    assert len(loaded.model.model.layers) == layers > 1
    assert built and len(built) <= 2 and set(built) == {built[0]}  # transformers' walk, then the blocks' reader
    assert gguf.get_tensor_name_map.__name__ == "<lambda>"  # put back after the load


def test_a_gguf_files_config_and_tokenizer_are_parsed_at_its_first_load_only(tmp_path: Path, monkeypatch):
    """Each parse reads the whole vocabulary (about 4 s each for the default's Q4_K_M, at every start)."""
    import gguf

    file = build_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(paths, "_configured", tmp_path / "cache")
    readers = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: readers.append(1) or reader(*args, **kwargs))
    first = load_model(file, "float32", "cpu", "gguf")
    parsed_first, readers[:] = len(readers), []
    again = load_model(file, "float32", "cpu", "gguf")
    assert parsed_first >= 3 and len(readers) == 1  # config, tokenizer, weights; then the weights alone
    text = "tokens of a prompt, 12 and 345"
    assert again.tokenizer(text).input_ids == first.tokenizer(text).input_ids and len(again.tokenizer) == len(first.tokenizer)
    assert again.model.config.to_dict() == first.model.config.to_dict()
    prompts = make_prompts(seed=3, vocab_size=first.model.config.vocab_size)
    assert run_engine(build(again, num_kv_blocks=512), prompts) == run_engine(build(first, num_kv_blocks=512), prompts, id_prefix="f")
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))  # changed in place: read afresh
    readers[:] = []
    load_model(file, "float32", "cpu", "gguf")
    assert len(readers) == parsed_first


def test_a_q8_0_embedding_is_looked_up_in_the_blocks_the_tied_head_serves(tiny_gguf: Path, tiny_k_gguf: Path):
    served = load_model(tiny_gguf, "float32", "cpu", "gguf").model
    embedding = served.get_input_embeddings()
    assert isinstance(embedding, BlockEmbedding) and embedding.q.data_ptr() == served.lm_head.q.data_ptr()  # one copy
    ids = torch.arange(embedding.num_embeddings).reshape(3, -1)
    assert torch.equal(embedding(ids), from_file(tiny_gguf).get_input_embeddings()(ids))  # the rows transformers reads
    # Blocks with offsets (Q4_K here) keep the float embedding: q * d + m is two roundings a compiler may fuse.
    assert type(load_model(tiny_k_gguf, "float32", "cpu", "gguf").model.get_input_embeddings()) is nn.Embedding


def test_the_start_line_says_which_weights_activations_kernels_and_compile_mode_serve(tiny_gguf: Path, caplog):
    loaded = load_model(tiny_gguf, "float32", "cpu", "gguf", activations="int16")
    with caplog.at_level("INFO", logger="server.engine_builder"):
        build(loaded, num_kv_blocks=8)
    (line,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("serving: ")]
    assert re.search(
        r"weights the GGUF file's own blocks \(\d+ (Q4_0|Q4_1|Q8_0)( \+ \d+ Q\d_\d)+\), \d+ MiB held; activations int16;", line
    ), line
    assert re.search(r"kernels C\+\+ built for [a-z0-9/]+ on this CPU: attention \w+, linears (avx512|avx2|generic) \(measured", line)
    assert line.endswith("compile off (eager; --compile compiles the step forward)")


def test_gguf_refuses_what_it_cannot_serve_exactly(tiny_gguf: Path, tiny_llama_dir: Path):
    with pytest.raises(ValueError, match="give a .gguf file as the model"):
        load_model(tiny_llama_dir, "float32", "cpu", "gguf")
    with pytest.raises(ValueError, match="gguf runs on the CPU with float32 activations"):
        load_model(tiny_gguf, "bfloat16", "cpu", "gguf")
    with pytest.raises(ValueError, match=r"is \(267, 64\) in the file, \(49152, 64\) in the model"):
        load_model(tiny_llama_dir, "float32", "cpu", "gguf", gguf_file=tiny_gguf)


def test_the_default_model_serves_its_shipped_4_bit_blocks(default_model_dir: Path):
    loaded = load_model(default_model_dir, "float32", "cpu", "gguf", gguf_file=default_gguf_file())
    kinds = [module.KIND for module in loaded.model.modules() if isinstance(module, GroupwiseLinear)]
    assert kinds.count("int4") == 210 and kinds.count("int8") == 1  # every Q4_1 linear, the Q8_0 tied head
    assert not any(isinstance(module, nn.Linear) for module in loaded.model.modules())
    assert isinstance(loaded.model.get_input_embeddings(), BlockEmbedding)  # read from the head's Q8_0 blocks
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*loaded.model.parameters(), *loaded.model.buffers()]}
    assert sum(held.values()) < 1.2 * default_gguf_file().stat().st_size  # the file's bits, float32 scales and offsets, the norms


def test_the_benchmarks_requantizer_writes_a_k_quant_file_tokenstep_serves(tiny_k_gguf: Path, tmp_path: Path):
    """benchmarks/requantize_gguf.py: a Q4_K_M-like mix of a GGUF file, with
    llama.cpp's 32-weight fallbacks where rows are not whole super-blocks."""
    from benchmarks.requantize_gguf import requantize

    target = tmp_path / "tiny-k" / "requantized.gguf"
    target.parent.mkdir()
    counts = requantize(tiny_k_gguf, target)
    assert counts["Q4_K"] == 10 and counts["Q6_K"] == 5  # q, k, o, gate, up; v, down and the embedding (rows of 256, 512)
    served, kinds = served_kinds(target)
    assert kinds["model.layers.0.self_attn.v_proj"] == ("Q6_K", "int8") and kinds["lm_head"] == ("Q6_K", "int8")
    assert isinstance(served.get_input_embeddings(), BlockEmbedding)


def test_auto_serves_a_gguf_files_blocks_with_int16_activations_and_anything_else_as_stored(
    tiny_gguf: Path, tiny_llama_dir: Path, tmp_path: Path
):
    """The server's default (``--quantization auto --activations auto``):
    a GGUF file's own blocks with int16 activations on the CPU in float32;
    in bfloat16, from a checkpoint of floats, or from a GGUF file of floats,
    the checkpoint's dtype with its exact outputs."""
    served = load_model(tiny_gguf, "auto", "cpu", "auto", activations="auto")
    assert served.weights.startswith("the GGUF file's own blocks (") and served.activations == "int16"
    assert any(isinstance(module, IntActivationLinear) for module in served.model.modules())
    exact = load_model(tiny_gguf, "auto", "cpu", "auto", activations="float32")
    assert exact.weights.startswith("the GGUF file's own blocks (") and exact.activations == "float32"
    for loaded, dtype in (
        (load_model(tiny_gguf, "bfloat16", "cpu", "auto", activations="auto"), "bfloat16"),
        (load_model(tiny_llama_dir, "auto", "cpu", "auto", activations="auto"), "float32"),
        (
            load_model(
                build_tiny_llama_gguf(tmp_path / "f32.gguf", dict.fromkeys(TYPES, "F32"), "F32"), "auto", "cpu", "auto", activations="auto"
            ),
            "float32",
        ),
    ):
        assert (loaded.weights, loaded.activations) == (dtype, "float32")
        assert not any(isinstance(module, GroupwiseLinear) for module in loaded.model.modules())
    with pytest.raises(ValueError, match="use it with --quantization int8 or gguf"):
        load_model(tiny_llama_dir, "auto", "cpu", "auto", activations="int16")
    # Weight-only int8 keeps float activations by default (int16 on it changes greedy outputs).
    int8 = load_model(tiny_llama_dir, "auto", "cpu", "int8", activations="auto")
    assert int8.weights.startswith("int8 groups of 32") and int8.activations == "float32"


def test_the_converted_default_keeps_the_file_whose_blocks_it_serves(tiny_gguf: Path, tmp_path: Path, monkeypatch):
    """The image converts the default model and drops the package that
    shipped it: the converted folder keeps the GGUF file, and the default's
    blocks are read from there."""
    target = tmp_path / "cache" / DEFAULT_MODEL_NAME
    convert_gguf(tiny_gguf.parent, tiny_gguf.name, target)
    assert (target / tiny_gguf.name).read_bytes() == tiny_gguf.read_bytes()
    assert (target / "model.safetensors").is_file()
    (target / GGUF_FILE).write_bytes(b"kept")
    monkeypatch.setattr(paths, "_configured", tmp_path / "cache")
    assert default_gguf_file() == target / GGUF_FILE
