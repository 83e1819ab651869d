"""What the pooling routes (``/v1/embeddings``, ``/v1/rerank``,
``/v1/score``) share: checking that the served model does the task asked,
the input caps, ``truncate_prompt_tokens`` (vLLM's field) resolved and
applied to a text, and running token lists through the batcher as pooling
requests, one each, to their pooled values in order.
"""

from collections.abc import AsyncIterator

from fastapi import Request

from batching.errors import InvalidRequestError
from batching.outputs import RequestOutput
from batching.pooling_params import PoolingParams
from server.choices import merge, start_choices, unless_disconnected
from server.state import Served

MAX_INPUTS = 2048  # inputs (or pairs) in one request, as OpenAI caps an embeddings request's


def check_task(state: Served, tasks: tuple[str, ...], what: str) -> None:
    """A 400 ``model_not_supported`` unless the served model is a pooling
    model doing one of ``tasks`` (``what`` the route does, for the message)."""
    if state.pooling is not None and state.pooling.task in tasks:
        return
    serves = "generates text" if state.pooling is None else f"is a pooling model serving {state.pooling.routes}"
    raise InvalidRequestError(f"The model `{state.model_name}` {serves}; it does not {what}", code="model_not_supported")


def check_input_count(count: int, param: str) -> None:
    if count > MAX_INPUTS:
        raise InvalidRequestError(f"{param}: at most {MAX_INPUTS} in one request, got {count}", param=param)


def truncation_limit(limit: int | None, state: Served) -> int | None:
    """``truncate_prompt_tokens`` as a token count (``-1``: the model's window), or None."""
    if limit == -1:
        return state.max_model_len
    if limit is not None and not 1 <= limit <= state.max_model_len:
        raise InvalidRequestError(f"truncate_prompt_tokens: must be -1 or in [1, {state.max_model_len}]", param="truncate_prompt_tokens")
    return limit


def text_token_ids(state: Served, text: str, limit: int | None) -> list[int]:
    """``text``'s token ids with the model's special tokens, cut by the
    tokenizer to ``limit`` where given; a 400 when it cannot be cut that
    short (the tokenizer keeps its special tokens past a tiny limit)."""
    try:
        token_ids = state.tokenizer(text, truncation=limit is not None, max_length=limit).input_ids
    except Exception as exc:  # tokenizers raise a bare Exception when nothing is left to cut
        raise _too_small(limit) from exc
    if limit is not None and len(token_ids) > limit:
        raise _too_small(limit)
    return token_ids


def _too_small(limit: int | None) -> InvalidRequestError:
    return InvalidRequestError(f"truncate_prompt_tokens ({limit}) is too small for this model's input", param="truncate_prompt_tokens")


async def pool(
    state: Served, raw_request: Request, token_lists: list[list[int]], params: PoolingParams | list[PoolingParams], request_id: str
) -> list[list[float]]:
    """The pooled values of each token list, in order: one pooling request
    each through the batcher, all aborted if the client leaves."""
    choices = await start_choices(state, token_lists, params, 1, request_id)
    outputs = merge(state, choices, raw_request.app.state.metrics, raw_request.app.state.settings.request_timeout)
    return await unless_disconnected(raw_request, _collect(outputs, len(token_lists)))


async def _collect(outputs: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[list[float]]:
    values: dict[int, list[float]] = {}
    async for index, output in outputs:
        if output.pooled is not None:
            values[index] = output.pooled
    return [values[index] for index in range(count)]
