"""``POST /v1/rerank`` (Jina's and Cohere's shape, as vLLM and llama-server
serve it; also at ``/rerank`` and ``/v2/rerank``) and ``POST /v1/score``
(vLLM's; also at ``/score``): how well text pairs match.

A cross-encoder scores each (query, document) pair: the pair is tokenized
as one input (the tokenizer's pair template, e.g. ``[CLS] q [SEP] d [SEP]``,
its second text marked by token type where the tokenizer marks it) and
becomes one pooling request through the batcher, answered with the model's
score. An embedding model scores by cosine similarity: each distinct text
is embedded once (one request each), as vLLM does. A pair longer than the
model reads is a 400 unless ``truncate_prompt_tokens`` is given (the
document, the second text, is then cut). Generating models answer 400.
"""

import time

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from batching.errors import InvalidRequestError
from batching.pooling_params import PoolingParams
from server.params import check_model
from server.pooling import check_input_count, check_task, pool, text_token_ids, truncation_limit
from server.protocol import new_id
from server.state import Served, served

router = APIRouter()


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model name (optional)")
    query: str
    documents: list[str | TextDocument] = Field(..., min_length=1)
    top_n: int | None = Field(None, ge=0, description="the best n results (0 or none: all)")
    return_documents: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model name (optional)")
    text_1: str | list[str] = Field(..., description="one text scored against each of text_2, or one per text_2")
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


@router.post("/v1/rerank")
@router.post("/v2/rerank", include_in_schema=False)  # Cohere's path; the same route
@router.post("/rerank", include_in_schema=False)
async def rerank(body: RerankRequest, raw_request: Request, state: Served = Depends(served)) -> dict:
    check_model(body.model, state)
    check_input_count(len(body.documents), "documents")
    documents = [document if isinstance(document, str) else document.text for document in body.documents]
    scores, num_tokens = await score_pairs(state, raw_request, [(body.query, document) for document in documents], body)
    order = sorted(range(len(documents)), key=lambda index: scores[index], reverse=True)
    order = order[: body.top_n] if body.top_n else order
    results = [
        {"index": index, "relevance_score": scores[index], "document": {"text": documents[index]} if body.return_documents else None}
        for index in order
    ]
    return {"id": raw_request.state.request_id, "model": state.model_name, "usage": {"total_tokens": num_tokens}, "results": results}


@router.post("/v1/score")
@router.post("/score", include_in_schema=False)
async def score(body: ScoreRequest, raw_request: Request, state: Served = Depends(served)) -> dict:
    check_model(body.model, state)
    firsts = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    seconds = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if not firsts or not seconds:
        raise InvalidRequestError("text_1 and text_2 must not be empty", param="text_1" if not firsts else "text_2")
    check_input_count(max(len(firsts), len(seconds)), "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise InvalidRequestError(
            f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: give one text_1, or one per text_2", param="text_1"
        )
    scores, num_tokens = await score_pairs(state, raw_request, list(zip(firsts, seconds)), body)
    data = [{"index": index, "object": "score", "score": value} for index, value in enumerate(scores)]
    usage = {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    header = {"id": raw_request.state.request_id, "object": "list", "created": int(time.time()), "model": state.model_name}
    return {**header, "data": data, "usage": usage}


async def score_pairs(
    state: Served, raw_request: Request, pairs: list[tuple[str, str]], body: RerankRequest | ScoreRequest
) -> tuple[list[float], int]:
    """Each pair's score, and the tokens the model read for them."""
    check_task(state, ("score", "embed"), "score text pairs (serve a reranker or an embedding model)")
    limit = truncation_limit(body.truncate_prompt_tokens, state)
    raw_request.state.request_id = request_id = new_id("score")
    if state.pooling.task == "score":
        inputs = [_pair_input(state, first, second, limit) for first, second in pairs]
        values = await pool(state, raw_request, [tokens for tokens, _ in inputs], [params for _, params in inputs], request_id)
        return [value[0] for value in values], sum(len(tokens) for tokens, _ in inputs)
    texts = list(dict.fromkeys(text for pair in pairs for text in pair))  # each distinct text embedded once
    token_lists = [text_token_ids(state, text, limit) for text in texts]
    vectors = dict(zip(texts, await pool(state, raw_request, token_lists, PoolingParams(), request_id)))
    return [_cosine(vectors[first], vectors[second]) for first, second in pairs], sum(map(len, token_lists))


def _pair_input(state: Served, first: str, second: str, limit: int | None) -> tuple[list[int], PoolingParams]:
    """A pair as the cross-encoder reads it: one token list, its second text
    marked where the tokenizer gives token types; or, for a reranker built
    on a causal LM, the chat template's rendering of the pair as messages."""
    pair_messages = state.pooling.pair_messages
    if pair_messages is not None:
        if limit is not None:
            raise InvalidRequestError(
                "truncate_prompt_tokens: this reranker renders pairs through its chat template, which tokenstep does not cut",
                param="truncate_prompt_tokens",
            )
        messages = pair_messages.messages(first, second)
        rendered = state.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **dict(pair_messages.template_kwargs))
        return list(rendered["input_ids"]), PoolingParams()
    try:
        encoded = state.tokenizer(first, second, truncation="only_second" if limit is not None else False, max_length=limit)
    except Exception as exc:  # tokenizers raise a bare Exception when the first text alone is too long
        raise InvalidRequestError(
            f"truncate_prompt_tokens ({limit}) leaves no room for the second text after the first; raise it or shorten the query",
            param="truncate_prompt_tokens",
        ) from exc
    if limit is not None and len(encoded.input_ids) > limit:
        raise InvalidRequestError(f"truncate_prompt_tokens ({limit}) is too small for this pair", param="truncate_prompt_tokens")
    types = encoded.get("token_type_ids")
    start = types.index(1) if types and 1 in types else None
    return encoded.input_ids, PoolingParams(second_text_start=start)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norms = sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5
    return dot / norms if norms else 0.0
