"""``POST /v1/embeddings``: inputs -> token ids -> one pooling request each
through the batcher -> vectors, as OpenAI's embeddings API answers.

``input`` is a string, a list of strings, a list of token ids or a list of
such lists; each becomes one engine request (batched with the others, and
with other clients', by the scheduler). ``encoding_format`` ``float`` gives
lists of numbers, ``base64`` the little-endian float32 bytes of each
vector (what the OpenAI SDK asks for by default). ``dimensions`` cuts a
Matryoshka model's vectors shorter and is a 400 for any other model. An
input longer than the model reads is a 400 unless ``truncate_prompt_tokens``
(vLLM's field) is given: a text is then cut by the tokenizer to that many
tokens, special tokens kept (``-1``: the model's window); token ids keep
their last ones, as vLLM does.
"""

import base64
import struct
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from batching.errors import InvalidRequestError
from batching.outputs import RequestOutput
from batching.pooling_params import PoolingParams
from server.choices import merge, start_choices, unless_disconnected
from server.params import check_model
from server.protocol import model_dump, new_id
from server.state import Served, served

router = APIRouter()
MAX_INPUTS = 2048  # inputs (or pairs) in one request, as OpenAI caps an embeddings request's


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model name (optional)")
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description="a string, strings, token ids or lists of token ids"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="a Matryoshka model's shorter vectors")
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="cut longer inputs to this many tokens (-1: the model's window)")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, raw_request: Request, state: Served = Depends(served)) -> JSONResponse:
    check_model(body.model, state)
    if state.pooling is None or state.pooling.task != "embed":
        what = "generates text" if state.pooling is None else "is a cross-encoder: it scores text pairs (/v1/rerank, /v1/score)"
        raise InvalidRequestError(
            f"The model `{state.model_name}` {what}; it does not serve embeddings (serve an embedding model)",
            code="model_not_supported",
        )
    params = PoolingParams(body.dimensions)
    state.pooling.check(params)
    inputs = input_token_lists(body, state)
    request_id = new_id("embd")
    raw_request.state.request_id = request_id
    choices = await start_choices(state, inputs, params, 1, request_id)
    outputs = merge(state, choices, raw_request.app.state.metrics, raw_request.app.state.settings.request_timeout)
    header = {"id": request_id, "created": int(time.time()), "model": state.model_name}
    usage = EmbeddingUsage(prompt_tokens=sum(map(len, inputs)), total_tokens=sum(map(len, inputs)))
    return JSONResponse(await unless_disconnected(raw_request, _collect(outputs, body.encoding_format, header, usage)))


def input_token_lists(body: EmbeddingRequest, state: Served) -> list[list[int]]:
    """Token ids of every input, cut to ``truncate_prompt_tokens`` where asked."""
    items = body.input
    if isinstance(items, str) or (items and all(isinstance(token, int) for token in items)):
        items = [items]
    if not items:
        raise InvalidRequestError("input must not be empty", param="input")
    check_input_count(len(items), "input")
    limit = body.truncate_prompt_tokens
    if limit == -1:
        limit = state.max_model_len
    if limit is not None and not 1 <= limit <= state.max_model_len:
        raise InvalidRequestError(f"truncate_prompt_tokens: must be -1 or in [1, {state.max_model_len}]", param="truncate_prompt_tokens")
    token_lists = []
    for item in items:
        if isinstance(item, str):
            try:
                token_ids = state.tokenizer(item, truncation=limit is not None, max_length=limit).input_ids
            except Exception as exc:  # tokenizers raise a bare Exception when the limit leaves no room past special tokens
                raise InvalidRequestError(
                    f"truncate_prompt_tokens ({limit}) is too small for this model's input", param="truncate_prompt_tokens"
                ) from exc
        else:
            token_ids = list(item)[-limit:] if limit else list(item)
        if not token_ids:
            raise InvalidRequestError("input must not be empty", param="input")
        if limit is not None and len(token_ids) > limit:  # the tokenizer keeps its special tokens past a tiny limit
            raise InvalidRequestError(
                f"truncate_prompt_tokens ({limit}) is too small for this model's input", param="truncate_prompt_tokens"
            )
        token_lists.append(token_ids)
    return token_lists


def check_input_count(count: int, param: str) -> None:
    if count > MAX_INPUTS:
        raise InvalidRequestError(f"{param}: at most {MAX_INPUTS} in one request, got {count}", param=param)


async def _collect(outputs: AsyncIterator[tuple[int, RequestOutput]], encoding_format: str, header: dict, usage: EmbeddingUsage) -> dict:
    vectors: dict[int, list[float]] = {}
    async for index, output in outputs:
        if output.pooled is not None:
            vectors[index] = output.pooled
    data = [Embedding(index=index, embedding=_encode(vectors[index], encoding_format)) for index in sorted(vectors)]
    return model_dump(EmbeddingResponse(**header, data=data, usage=usage))


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
