"""``POST /tokenize`` and ``POST /detokenize`` (as vLLM spells them).

``/tokenize`` with ``messages`` renders through ``server.chat_prompt``, the
chat route's own function, with the same ``tools``, ``tool_choice`` and
template options, so its ``count`` is the chat route's ``usage.prompt_tokens``.
"""

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from batching.errors import InvalidRequestError
from server.chat_prompt import build_chat_prompt, message_dicts
from server.params import check_model
from server.protocol import ChatMessage, ChatTemplateFields
from server.state import Served, served

router = APIRouter()


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for prompt, false for messages")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: Served = Depends(served)) -> TokenizeResponse:
    check_model(body.model, state)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt or messages", param="prompt")
    if body.prompt is not None:
        tokens = state.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False).input_ids
    else:
        tokens = build_chat_prompt(state, message_dicts(body.messages), body).token_ids
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: Served = Depends(served)) -> DetokenizeResponse:
    check_model(body.model, state)
    vocab_size = state.batcher.vocab_size
    bad = [t for t in body.tokens if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is out of range", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
