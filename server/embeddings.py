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
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from batching.errors import InvalidRequestError
from batching.pooling_params import PoolingParams
from server.params import check_model
from server.pooling import check_input_count, check_task, pool, text_token_ids, truncation_limit
from server.protocol import model_dump, new_id
from server.state import Served, served

router = APIRouter()


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
    check_task(state, ("embed",), "serve embeddings")
    params = PoolingParams(body.dimensions)
    state.pooling.check(params)
    inputs = input_token_lists(body, state)
    raw_request.state.request_id = request_id = new_id("embd")
    vectors = await pool(state, raw_request, inputs, params, request_id)
    data = [Embedding(index=index, embedding=_encode(vector, body.encoding_format)) for index, vector in enumerate(vectors)]
    usage = EmbeddingUsage(prompt_tokens=sum(map(len, inputs)), total_tokens=sum(map(len, inputs)))
    response = EmbeddingResponse(id=request_id, created=int(time.time()), model=state.model_name, data=data, usage=usage)
    return JSONResponse(model_dump(response))


def input_token_lists(body: EmbeddingRequest, state: Served) -> list[list[int]]:
    """Token ids of every input, cut to ``truncate_prompt_tokens`` where asked."""
    items = body.input
    if isinstance(items, str) or (items and all(isinstance(token, int) for token in items)):
        items = [items]
    if not items:
        raise InvalidRequestError("input must not be empty", param="input")
    check_input_count(len(items), "input")
    limit = truncation_limit(body.truncate_prompt_tokens, state)
    token_lists = []
    for item in items:
        token_ids = text_token_ids(state, item, limit) if isinstance(item, str) else (list(item)[-limit:] if limit else list(item))
        if not token_ids:
            raise InvalidRequestError("input must not be empty", param="input")
        token_lists.append(token_ids)
    return token_lists


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
