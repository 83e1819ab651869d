"""Pooling models through the real engine (scheduler, core, ``PoolingRunner``):
each input's vector equals what sentence-transformers gives for it alone,
whatever the batch around it; checkpoints whose output tokenstep does not
compute are refused at load."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, BertConfig

from batching.engine_core import EngineCore
from batching.pooling_params import PoolingParams
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core
from tests.tiny_pooling import TINY_ENCODER, build_tiny_sentence_transformer

# Ragged lengths in one batch, one longer than ModernBERT's tiny local window (8).
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill.",
    "hello",
    "Embeddings, reranking and scoring through the same batcher.",
    "x y",
]


def embed(core: EngineCore, token_lists: list[list[int]], params: PoolingParams = PoolingParams()) -> torch.Tensor:
    """The engine's vectors for ``token_lists``, all queued before the first step."""
    for index, token_ids in enumerate(token_lists):
        core.add_request(core.make_request(f"e{index}", token_ids, params))
    vectors = {}
    while core.has_unfinished:
        for output in core.step():
            assert output.error is None, output.error
            vectors[output.request_id] = output.pooled
    return torch.tensor([vectors[f"e{index}"] for index in range(len(token_lists))])  # [N, H]


def engine_for(model_dir: Path) -> EngineCore:
    return build_engine_core(EngineConfig(model=str(model_dir)), load_model(model_dir))


@pytest.mark.parametrize(
    "model_type, pooling, normalize",
    [
        ("bert", "mean", True),
        ("bert", "cls", False),
        ("bert", "weighted_mean", False),
        ("xlm-roberta", "mean", False),  # unnormalized: a wrong scale would show
        ("xlm-roberta", "cls", True),
        ("modernbert", "max", False),
        ("modernbert", "mean_sqrt_len", False),
        ("qwen3", "last", True),  # a decoder embedder (Qwen3-Embedding's shape): causal, last token
    ],
)
def test_each_inputs_vector_is_sentence_transformers_for_it_alone(tmp_path, default_model_dir, model_type, pooling, normalize):
    model_dir = build_tiny_sentence_transformer(tmp_path / model_type, default_model_dir, model_type, pooling, normalize)
    core = engine_for(model_dir)
    token_lists = [core.tokenizer(text).input_ids for text in TEXTS]
    got = embed(core, token_lists)
    assert core.num_steps == 1  # all four in one padded forward
    want = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, batch_size=1, convert_to_tensor=True)
    torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, pooling", [("bert", "mean"), ("modernbert", "max"), ("qwen3", "last")])
def test_a_checkpoint_saved_by_sentence_transformers_6_is_read_as_it_reads_it(tmp_path, default_model_dir, model_type, pooling):
    """sentence-transformers 6 saves its own module paths (``...base.modules.transformer.Transformer``),
    ``pooling_mode`` instead of the ``pooling_mode_*`` flags and a ``transformer_task``."""
    legacy = build_tiny_sentence_transformer(tmp_path / "legacy", default_model_dir, model_type, pooling, normalize=False)
    SentenceTransformer(str(legacy), device="cpu").save(str(tmp_path / "saved"))
    assert "pooling_mode" in json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    core = engine_for(tmp_path / "saved")
    got = embed(core, [core.tokenizer(text).input_ids for text in TEXTS])
    want = SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(TEXTS, batch_size=1, convert_to_tensor=True)
    torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-5)


def test_the_real_all_minilm_gives_sentence_transformers_vectors_and_ranks_by_meaning(all_minilm_dir):
    core = engine_for(all_minilm_dir)
    assert core.max_model_len == 256  # its sentence_bert_config.json caps the 512 positions
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."]
    got = embed(core, [core.tokenizer(text).input_ids for text in texts])
    want = SentenceTransformer(str(all_minilm_dir), device="cpu").encode(texts, batch_size=1, convert_to_tensor=True)
    torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-5)
    assert got.shape == (3, 384) and torch.allclose(got.norm(dim=1), torch.ones(3))
    similarity = got @ got.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]


def test_a_matryoshka_models_shorter_vectors_are_the_pooled_prefix_renormalized(tmp_path, default_model_dir):
    model_dir = build_tiny_sentence_transformer(tmp_path / "matryoshka", default_model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}))
    core = engine_for(model_dir)
    token_lists = [core.tokenizer(text).input_ids for text in TEXTS]
    got = embed(core, token_lists, PoolingParams(dimensions=8))
    model = SentenceTransformer(str(model_dir), device="cpu")
    pooled = SentenceTransformer(modules=[model[0], model[1]], device="cpu").encode(TEXTS, batch_size=1, convert_to_tensor=True)
    torch.testing.assert_close(got, F.normalize(pooled[:, :8].cpu(), dim=1), rtol=1e-5, atol=1e-5)


def test_a_plain_encoder_without_modules_json_pools_its_cls_token_normalized(tmp_path, default_model_dir):
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(**TINY_ENCODER, pad_token_id=0)).eval()
    model.save_pretrained(tmp_path / "plain-bert")
    build_tiny_sentence_transformer(tmp_path / "tokenizer-source", default_model_dir)  # for its tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "plain-bert" / name).write_bytes((tmp_path / "tokenizer-source" / name).read_bytes())
    core = engine_for(tmp_path / "plain-bert")
    token_ids = core.tokenizer(TEXTS[0]).input_ids
    got = embed(core, [token_ids])
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([token_ids])).last_hidden_state  # [1, L, H]
    torch.testing.assert_close(got, F.normalize(hidden[:, 0], dim=1), rtol=1e-5, atol=1e-5)


def test_the_position_limit_of_a_roberta_family_encoder_leaves_out_its_padding_offset(tmp_path, default_model_dir):
    model_dir = build_tiny_sentence_transformer(tmp_path / "xlmr", default_model_dir, "xlm-roberta")
    assert load_model(model_dir).max_model_len == 128  # 130 positions, from pad_token_id + 1 = 2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(extra_modules=("Dense",)), "Dense, whose output it does not compute"),
        (dict(extra_modules=("LayerNorm",)), "LayerNorm"),
        # a LogitScore after pooling is no layout sentence-transformers makes (a reranker's is Transformer, LogitScore)
        (dict(model_type="qwen3", pooling="last", extra_modules=("LogitScore",)), "LogitScore"),
    ],
)
def test_a_checkpoint_with_modules_tokenstep_does_not_compute_is_refused(tmp_path, default_model_dir, change, message):
    model_dir = build_tiny_sentence_transformer(tmp_path / "refused", default_model_dir, **change)
    with pytest.raises(ValueError, match=message):
        load_model(model_dir)


def test_two_pooling_modes_lowercasing_and_a_decoder_without_modules_json_are_refused(tmp_path, default_model_dir):
    model_dir = build_tiny_sentence_transformer(tmp_path / "two-modes", default_model_dir)
    pooling_file = model_dir / "1_Pooling" / "config.json"
    pooling_file.write_text(json.dumps({**json.loads(pooling_file.read_text()), "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="combines"):
        load_model(model_dir)
    model_dir = build_tiny_sentence_transformer(tmp_path / "lowercase", default_model_dir)
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"do_lower_case": True}))
    with pytest.raises(ValueError, match="lowercases"):
        load_model(model_dir)
    model_dir = build_tiny_sentence_transformer(tmp_path / "decoder", default_model_dir, "qwen3", "last")
    (model_dir / "modules.json").unlink()
    with pytest.raises(ValueError, match="no modules.json"):
        load_model(model_dir)
    with pytest.raises(ValueError, match="pooling model"):
        load_model(build_tiny_sentence_transformer(tmp_path / "int8", default_model_dir), quantization="int8")


def test_task_decides_what_a_checkpoint_that_can_do_both_serves(tmp_path, default_model_dir, tiny_llama_dir):
    """A causal LM saved with a sentence-transformers pooling (Qwen3-Embedding's
    layout) embeds by default and generates with --task generate; a plain
    causal LM embeds with --task embed by its last token, normalized."""
    model_dir = build_tiny_sentence_transformer(tmp_path / "qwen3-lm", default_model_dir, "qwen3", "last", causal_lm=True)
    embedder = engine_for(model_dir)
    assert embedder.pooling.task == "embed"
    want = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS[:2], batch_size=1, convert_to_tensor=True)
    torch.testing.assert_close(
        embed(embedder, [embedder.tokenizer(text).input_ids for text in TEXTS[:2]]), want.cpu(), rtol=1e-5, atol=1e-5
    )
    generator = load_model(model_dir, task="generate")
    assert generator.pooling is None and type(generator.model).__name__ == "Qwen3ForCausalLM"

    core = build_engine_core(EngineConfig(model=str(tiny_llama_dir), task="embed"), load_model(tiny_llama_dir, task="embed"))
    token_ids = core.tokenizer(TEXTS[0]).input_ids
    got = embed(core, [token_ids])
    with torch.inference_mode():
        hidden = AutoModel.from_pretrained(tiny_llama_dir)(input_ids=torch.tensor([token_ids])).last_hidden_state  # [1, L, H]
    torch.testing.assert_close(got, F.normalize(hidden[:, -1], dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no cross-encoder"):
        load_model(tiny_llama_dir, task="score")


def test_an_encoder_asked_to_generate_is_refused_not_served_with_a_random_head(tmp_path):
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(**TINY_ENCODER, pad_token_id=0)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="lacks weights a BertLMHeadModel needs"):
        load_model(tmp_path / "bert", task="generate")
