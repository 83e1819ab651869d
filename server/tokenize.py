"""``GET /v1/models``, ``POST /tokenize`` and ``POST /detokenize`` (as vLLM spells them)."""

import time
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from batching.errors import InvalidRequestError
from server.app import Served, served
from server.chat import render_chat
from server.generation import check_model
from server.protocol import ChatMessage

router = APIRouter()
STARTED_AT = int(time.time())


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for prompt, false for messages")
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.get("/v1/models")
async def list_models(state: Served = Depends(served)) -> dict[str, Any]:
    card = {
        "id": state.model_name,
        "object": "model",
        "created": STARTED_AT,
        "owned_by": "tokenstep",
        "root": state.model_root or state.model_name,
        "parent": None,
        "max_model_len": state.max_model_len,
        "permission": [],
    }
    return {"object": "list", "data": [card]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: Served = Depends(served)) -> TokenizeResponse:
    check_model(body.model, state)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt or messages", param="prompt")
    if body.prompt is not None:
        tokens = state.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False).input_ids
    else:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])} for m in body.messages]
        tokens = render_chat(state, messages, body.add_generation_prompt)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: Served = Depends(served)) -> DetokenizeResponse:
    check_model(body.model, state)
    vocab_size = state.batcher.core.vocab_size
    bad = [t for t in body.tokens if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is out of range", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
