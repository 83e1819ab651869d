"""``/v1/rerank`` and ``/v1/score`` served for real (uvicorn, plain httpx as
rerank clients send it): a cross-encoder's scores are the model's for each
pair alone, sorted, cut to ``top_n``; an embedding model scores by cosine
similarity of sentence-transformers' vectors; bad input is a clear 400."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from sentence_transformers import CrossEncoder, SentenceTransformer

from tests.e2e.conftest import ServerProcess, running_server
from tests.tiny_pooling import build_tiny_causal_reranker, build_tiny_cross_encoder

QUERY = "what is the capital of france"
DOCUMENTS = ["the cat sat on the mat", "paris is the capital city of france", "a monkey is playing drums", "france"]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-reranker"), default_model_dir)


@pytest.fixture(scope="module")
def reranker_server(reranker_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "reranker_server.log"
    yield from running_server([str(reranker_dir), "--served-model-name", "reranker"], log)


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def test_rerank_sorts_documents_by_the_cross_encoders_own_scores(reranker_server: ServerProcess, reranker_dir: Path):
    want = CrossEncoder(str(reranker_dir), device="cpu").predict([(QUERY, document) for document in DOCUMENTS], batch_size=1)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        response = post(reranker_server, path, {"model": "reranker", "query": QUERY, "documents": DOCUMENTS})
        assert response.status_code == 200, response.text
        body = response.json()
        results = body["results"]
        assert [result["index"] for result in results] == sorted(range(4), key=lambda index: -want[index])
        for result in results:
            assert result["relevance_score"] == pytest.approx(float(want[result["index"]]), abs=1e-5)
            assert result["document"] == {"text": DOCUMENTS[result["index"]]}
        assert body["model"] == "reranker" and body["usage"]["total_tokens"] > 0


def test_top_n_return_documents_and_document_objects(reranker_server: ServerProcess):
    everything = post(reranker_server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}).json()["results"]
    body = {"query": QUERY, "documents": [{"text": document} for document in DOCUMENTS], "top_n": 2, "return_documents": False}
    results = post(reranker_server, "/v1/rerank", body).json()["results"]
    assert [result["index"] for result in results] == [result["index"] for result in everything[:2]]
    assert all(result["document"] is None for result in results)


def test_score_pairs_one_to_many_and_many_to_many(reranker_server: ServerProcess, reranker_dir: Path):
    cross_encoder = CrossEncoder(str(reranker_dir), device="cpu")
    one_to_many = post(reranker_server, "/v1/score", {"model": "reranker", "text_1": QUERY, "text_2": DOCUMENTS}).json()
    want = cross_encoder.predict([(QUERY, document) for document in DOCUMENTS], batch_size=1)
    assert [item["score"] for item in one_to_many["data"]] == pytest.approx([float(value) for value in want], abs=1e-5)
    assert [item["index"] for item in one_to_many["data"]] == [0, 1, 2, 3] and one_to_many["object"] == "list"
    pairs = {"text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:]}
    many = post(reranker_server, "/score", pairs).json()
    want = cross_encoder.predict(list(zip(DOCUMENTS[:2], DOCUMENTS[2:])), batch_size=1)
    assert [item["score"] for item in many["data"]] == pytest.approx([float(value) for value in want], abs=1e-5)
    assert many["usage"]["prompt_tokens"] == many["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1"),
        ("/v1/score", {"text_1": [], "text_2": ["a"]}, "text_1"),
        ("/v1/rerank", {"query": QUERY, "documents": ["word " * 200]}, "input"),  # past the 128 positions
        (
            "/v1/rerank",
            {"query": "the cat sat on the mat " * 5, "documents": ["dog"], "truncate_prompt_tokens": 8},
            "truncate_prompt_tokens",
        ),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"] * 2049}, "documents"),
        ("/v1/embeddings", {"input": "hi"}, None),  # a cross-encoder makes no vectors
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None),
    ],
)
def test_bad_requests_are_clear_400s(reranker_server: ServerProcess, path: str, body: dict, param: str | None):
    response = post(reranker_server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param), error


def test_a_long_document_is_cut_when_truncation_is_asked_for(reranker_server: ServerProcess):
    body = {"query": QUERY, "documents": ["word " * 200], "truncate_prompt_tokens": 64}
    response = post(reranker_server, "/v1/rerank", body)
    assert response.status_code == 200 and response.json()["usage"]["total_tokens"] == 64


def test_an_embedding_model_reranks_and_scores_by_cosine_similarity(embedding_server: ServerProcess, all_minilm_dir: Path):
    embedder = SentenceTransformer(str(all_minilm_dir), device="cpu")
    query, documents = "A man is eating food.", ["A man is eating a piece of bread.", "A monkey is playing drums.", "Paris is in France."]
    vectors = embedder.encode([query, *documents], batch_size=1, convert_to_tensor=True).cpu()
    want = torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:]).tolist()
    results = post(embedding_server, "/v1/rerank", {"query": query, "documents": documents}).json()["results"]
    assert results[0]["index"] == 0
    assert {result["index"]: result["relevance_score"] for result in results} == pytest.approx(dict(enumerate(want)), abs=1e-5)
    scored = post(embedding_server, "/v1/score", {"text_1": query, "text_2": documents}).json()
    assert [item["score"] for item in scored["data"]] == pytest.approx(want, abs=1e-5)
    too_short = post(embedding_server, "/v1/rerank", {"query": query, "documents": documents, "truncate_prompt_tokens": 1})
    assert too_short.status_code == 400 and too_short.json()["error"]["param"] == "truncate_prompt_tokens"  # no room past [CLS] [SEP]


def test_a_generating_model_does_not_score(tiny_server: ServerProcess):
    response = post(tiny_server, "/v1/rerank", {"query": "a", "documents": ["b"]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_supported"


def test_a_causal_lm_reranker_is_served_as_sentence_transformers_6_predicts(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
):
    """Pairs rendered through the reranker's chat template by the server, scored by "yes" less "no"."""
    model_dir = build_tiny_causal_reranker(tmp_path_factory.mktemp("causal-reranker") / "reranker", default_model_dir)
    want = CrossEncoder(str(model_dir), device="cpu").predict([(QUERY, document) for document in DOCUMENTS], batch_size=1)
    log = tmp_path_factory.mktemp("logs") / "causal_reranker_server.log"
    for server in running_server([str(model_dir), "--served-model-name", "reranker"], log):
        results = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}).json()["results"]
        assert {result["index"]: result["relevance_score"] for result in results} == pytest.approx(
            {index: float(value) for index, value in enumerate(want)}, abs=1e-5
        )
        assert [result["index"] for result in results] == sorted(range(4), key=lambda index: -want[index])
        response = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "truncate_prompt_tokens": 64})
        assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens"
