"""``POST /v1/embeddings`` served for real (uvicorn) with the real
all-MiniLM-L6-v2, through the OpenAI SDK (its default base64 encoding and
``float``), langchain's ``OpenAIEmbeddings`` and plain httpx: the vectors are
sentence-transformers' for each input alone, many requests in flight share
steps, and bad input gets a clear 400."""

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI
from sentence_transformers import SentenceTransformer

from tests.e2e.conftest import ServerProcess

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums.", "Paris is in France."]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def client(embedding_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{embedding_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(all_minilm_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(all_minilm_dir), device="cpu")


def vectors(response) -> torch.Tensor:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return torch.tensor([item.embedding for item in response.data])  # [N, 384]


def test_the_sdks_default_base64_and_float_give_sentence_transformers_vectors(client: OpenAI, reference: SentenceTransformer):
    want = reference.encode(TEXTS, batch_size=1, convert_to_tensor=True).cpu()
    response = client.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    torch.testing.assert_close(vectors(response), want, **TOLERANCE)
    assert response.model == "minilm" and response.object == "list"
    num_tokens = sum(len(reference.tokenizer(text).input_ids) for text in TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == num_tokens
    alone = client.embeddings.create(model="minilm", input=TEXTS[2], encoding_format="float")
    assert isinstance(alone.data[0].embedding, list) and len(alone.data[0].embedding) == 384
    torch.testing.assert_close(vectors(alone)[0], want[2], **TOLERANCE)


def test_token_ids_are_embedded_as_given(client: OpenAI, reference: SentenceTransformer):
    token_lists = [reference.tokenizer(text).input_ids for text in TEXTS[:2]]
    by_text = vectors(client.embeddings.create(model="minilm", input=TEXTS[:2], encoding_format="float"))
    one = client.embeddings.create(model="minilm", input=token_lists[0], encoding_format="float")
    many = client.embeddings.create(model="minilm", input=token_lists, encoding_format="float")
    torch.testing.assert_close(vectors(one)[0], by_text[0], **TOLERANCE)
    torch.testing.assert_close(vectors(many), by_text, **TOLERANCE)
    assert many.usage.prompt_tokens == sum(map(len, token_lists))


def test_many_clients_at_once_get_their_own_vectors(embedding_server: ServerProcess, reference: SentenceTransformer):
    want = reference.encode(TEXTS, batch_size=1, convert_to_tensor=True).cpu()

    async def run() -> list:
        async with AsyncOpenAI(base_url=f"{embedding_server.base_url}/v1", api_key="unused", max_retries=0) as client:
            calls = [client.embeddings.create(model="minilm", input=TEXTS[i % 4], encoding_format="float") for i in range(24)]
            return await asyncio.gather(*calls)

    for index, response in enumerate(asyncio.run(run())):
        torch.testing.assert_close(vectors(response)[0], want[index % 4], **TOLERANCE)
    stats = httpx.get(f"{embedding_server.base_url}/stats").json()
    assert stats["model"]["task"] == "embed" and stats["totals"]["pooled_requests"] >= 24 and stats["kv"]["blocks"] == 0
    metrics = httpx.get(f"{embedding_server.base_url}/metrics").text
    pooled = next(line for line in metrics.splitlines() if line.startswith("tokenstep_pooled_requests"))
    assert float(pooled.split()[-1]) >= 24


def test_langchains_openai_embeddings_work_against_it(embedding_server: ServerProcess, reference: SentenceTransformer):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send text, not tiktoken ids of OpenAI's vocabulary
    embedder = OpenAIEmbeddings(
        model="minilm", base_url=f"{embedding_server.base_url}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    got = torch.tensor(embedder.embed_documents(TEXTS[:2]) + [embedder.embed_query(TEXTS[3])])
    want = reference.encode([TEXTS[0], TEXTS[1], TEXTS[3]], batch_size=1, convert_to_tensor=True).cpu()
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_long_inputs_are_a_400_unless_truncation_is_asked_for(client: OpenAI, embedding_server: ServerProcess):
    long_text = "word " * 400  # ~400 tokens; the model reads 256
    with pytest.raises(BadRequestError) as error:
        client.embeddings.create(model="minilm", input=long_text)
    assert error.value.code == "context_length_exceeded" and "256" in error.value.message
    response = client.embeddings.create(model="minilm", input=long_text, extra_body={"truncate_prompt_tokens": -1})
    assert response.usage.prompt_tokens == 256
    response = client.embeddings.create(model="minilm", input=[101] + [2773] * 300, extra_body={"truncate_prompt_tokens": 20})
    assert response.usage.prompt_tokens == 20


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": "hi", "dimensions": 64}, "dimensions"),  # not a Matryoshka model
        ({"input": [10**9]}, "prompt"),
        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": "hi", "truncate_prompt_tokens": 1}, "truncate_prompt_tokens"),  # no room past [CLS] and [SEP]
        ({"input": ["hi"] * 2049}, "input"),
    ],
)
def test_bad_input_is_a_clear_400(embedding_server: ServerProcess, body: dict, param: str):
    response = httpx.post(f"{embedding_server.base_url}/v1/embeddings", json={"model": "minilm", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_a_pooling_model_answers_the_generating_routes_with_a_400(client: OpenAI):
    with pytest.raises(BadRequestError, match="pooling model") as error:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_supported"
    with pytest.raises(BadRequestError, match="/v1/embeddings"):
        client.completions.create(model="minilm", prompt="hi")
    with pytest.raises(NotFoundError):
        client.embeddings.create(model="not-this-one", input="hi")


def test_a_generating_model_answers_embeddings_with_a_400(tiny_server: ServerProcess):
    response = httpx.post(f"{tiny_server.base_url}/v1/embeddings", json={"model": "tiny", "input": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported" and "does not serve embeddings" in response.json()["error"]["message"]
