"""Cross-encoders (rerankers) through the real engine: each text pair's score,
batched with pairs of other lengths, equals sentence-transformers'
``CrossEncoder.predict`` for it alone (the model's own logit through the
activation its config names); what tokenstep cannot score is refused."""

import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import CrossEncoder

from batching.engine_core import EngineCore
from batching.pooling_params import PoolingParams
from model_runtime.loading.loader import load_model
from server.engine_builder import EngineConfig, build_engine_core
from tests.tiny_pooling import build_tiny_causal_reranker, build_tiny_cross_encoder

PAIRS = [
    ("what is the capital of france", "paris is the capital city of france"),
    ("cat", "the dog sat on the mat and the cat sat on the dog while the monkey played the drums"),
    ("a", "b"),
    ("man eating food", "a man is eating bread"),
]


def scores(core: EngineCore, pairs: list[tuple[str, str]]) -> list[float]:
    """The engine's score of each pair, all queued before the first step;
    the second text marked by token type where the tokenizer marks it."""
    for index, (first, second) in enumerate(pairs):
        encoded = core.tokenizer(first, second)
        types = encoded.get("token_type_ids")
        start = types.index(1) if types and 1 in types else None
        core.add_request(core.make_request(f"p{index}", encoded.input_ids, PoolingParams(second_text_start=start)))
    results = {}
    while core.has_unfinished:
        for output in core.step():
            assert output.error is None, output.error
            results[output.request_id] = output.pooled
    assert all(len(values) == 1 for values in results.values())
    return [results[f"p{index}"][0] for index in range(len(pairs))]


@pytest.mark.parametrize(
    "model_type, activation",
    [
        ("bert", None),  # WordPiece pairs: [CLS] q [SEP] d [SEP], token types 0 / 1
        ("bert", "torch.nn.modules.linear.Identity"),  # raw logits, as the config names
        ("xlm-roberta", None),  # BGE-reranker's architecture: no token types
        ("qwen3", None),  # a decoder with a classification head: its last real token
    ],
)
def test_each_pairs_score_is_the_cross_encoders_for_it_alone(tmp_path, default_model_dir, model_type, activation):
    model_dir = build_tiny_cross_encoder(tmp_path / model_type, default_model_dir, model_type, activation)
    core = build_engine_core(EngineConfig(model=str(model_dir)), load_model(model_dir))
    assert core.pooling.task == "score" and core.scheduler.block_manager.num_blocks == 0
    got = torch.tensor(scores(core, PAIRS))
    assert core.num_steps == 1
    want = torch.tensor(CrossEncoder(str(model_dir), device="cpu").predict(PAIRS, batch_size=1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_token_types_matter_to_a_bert_cross_encoder(tmp_path, default_model_dir):
    """The check above could not tell a pair's token types from none: here it can."""
    model_dir = build_tiny_cross_encoder(tmp_path / "bert", default_model_dir)
    core = build_engine_core(EngineConfig(model=str(model_dir)), load_model(model_dir))
    (with_types,) = scores(core, PAIRS[:1])
    core.add_request(core.make_request("plain", core.tokenizer(*PAIRS[0]).input_ids, PoolingParams()))
    (without_types,) = core.step()
    assert abs(with_types - without_types.pooled[0]) > 1e-4


def test_classifiers_with_more_labels_unknown_activations_or_no_pad_id_are_refused(tmp_path, default_model_dir):
    model_dir = build_tiny_cross_encoder(tmp_path / "labels", default_model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(ValueError, match="3 labels"):
        load_model(model_dir)
    model_dir = build_tiny_cross_encoder(tmp_path / "tanh", default_model_dir, activation="torch.nn.modules.activation.Tanh")
    with pytest.raises(ValueError, match="Tanh"):
        load_model(Path(model_dir))
    # transformers' decoder classifiers raise on any batch of two or more without a pad id: refused, not failing every step
    model_dir = build_tiny_cross_encoder(tmp_path / "no-pad", default_model_dir, "qwen3")
    (model_dir / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()), "pad_token_id": None}))
    with pytest.raises(ValueError, match="without a pad_token_id"):
        load_model(model_dir)


@pytest.mark.parametrize("prompt", ["Find passages about cities", None])
def test_a_causal_lm_reranker_scores_as_sentence_transformers_6_predicts(tmp_path, default_model_dir, prompt):
    """A LogitScore checkpoint (Qwen3-Reranker's way): the pair rendered by
    the chat template as [system: the default prompt] [query] [document],
    "yes" less "no" at the last token, a sigmoid; rows of other lengths
    left-padded beside it in one step."""
    model_dir = build_tiny_causal_reranker(tmp_path / "reranker", default_model_dir, prompt)
    core = build_engine_core(EngineConfig(model=str(model_dir)), load_model(model_dir))
    pair_messages = core.pooling.pair_messages
    assert core.pooling.task == "score" and pair_messages.system_prompt == prompt
    for index, (query, document) in enumerate(PAIRS):
        rendered = core.tokenizer.apply_chat_template(pair_messages.messages(query, document), tokenize=True, return_dict=True)
        core.add_request(core.make_request(f"p{index}", list(rendered["input_ids"]), PoolingParams()))
    results = {}
    while core.has_unfinished:
        results |= {output.request_id: output.pooled[0] for output in core.step()}
    assert core.num_steps == 1
    got = torch.tensor([results[f"p{index}"] for index in range(len(PAIRS))])
    want = torch.tensor(CrossEncoder(str(model_dir), device="cpu").predict(PAIRS, batch_size=1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
