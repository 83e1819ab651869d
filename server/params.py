"""Request fields -> engine terms: ``SamplingParams`` (with the output
constraint), the model check, the context-window check and the default
length. Shared by every generating route; raises ``InvalidRequestError``
(400/404) before anything reaches the engine.
"""

import json

from batching.errors import InvalidRequestError
from batching.sampling_params import SamplingParams
from batching.structured import GuidedDecoding
from batching.thinking import ThinkingSpec
from server.errors import ModelNotFoundError
from server.protocol import SamplingFields
from server.state import Served
from server.tools import ToolPlan


def guided_decoding(body: SamplingFields) -> GuidedDecoding | None:
    """The request's output constraint: ``response_format`` or one ``guided_*``
    field (400 if several are given). The grammar compiles later, in the engine."""
    given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar") if getattr(body, name) is not None]
    response_format = body.response_format
    if response_format is not None and response_format.type != "text":
        given.insert(0, "response_format")
    if len(given) > 1:
        raise InvalidRequestError(f"give one output constraint, not several: {', '.join(given)}", param=given[1])
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        if response_format.type == "json_object":
            return GuidedDecoding.json_object()
        spec = response_format.json_schema
        if spec is None:
            raise InvalidRequestError("response_format of type json_schema needs a json_schema object", param="response_format")
        return GuidedDecoding.json_schema(spec.schema_ if spec.schema_ is not None else {"type": "object"}, "response_format")
    if name == "guided_json":
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"guided_json is not valid JSON: {exc}", param="guided_json") from None
        return GuidedDecoding.json_schema(schema, "guided_json")
    if name == "guided_regex":
        return GuidedDecoding.regex(body.guided_regex)
    if name == "guided_choice":
        return GuidedDecoding.choice(body.guided_choice)
    return GuidedDecoding.lark(body.guided_grammar)


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    plan: ToolPlan | None = None,
    thinking: ThinkingSpec | None = None,
    keep_special_tokens: bool = False,
) -> SamplingParams:
    """``plan``: the request's tools. A forced call is a constraint the route
    imposes itself, which may not be combined with one from the request body;
    a format whose tags are special tokens keeps special tokens in the text.
    ``thinking``: a thinking model's block, kept only where it changes
    something (a budget, or a constraint that then applies after the block).
    ``keep_special_tokens``: the model's output is read by its special tokens (harmony's channels)."""
    guided = _one_constraint(plan.guided() if plan is not None else None, guided_decoding(body))
    if thinking is not None and thinking.max_thinking_tokens is None and guided is None:
        thinking = None
    keeps_special_tokens = keep_special_tokens or (plan is not None and plan.parses_calls and plan.tool_format.needs_special_tokens)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        logit_bias = {int(token): bias for token, bias in (body.logit_bias or {}).items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        logit_bias=logit_bias,
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens and not keeps_special_tokens,
        guided=guided,
        thinking=thinking,
    )


def _one_constraint(imposed: GuidedDecoding | None, requested: GuidedDecoding | None) -> GuidedDecoding | None:
    if imposed is not None and requested is not None:
        raise InvalidRequestError(f"a forced tool call cannot be combined with {requested.param}", param=requested.param)
    return imposed or requested


def check_model(requested: str | None, state: Served) -> None:
    if requested and requested != state.model_name and requested != state.model_root:
        raise ModelNotFoundError(f"The model `{requested}` does not exist. Available: {state.model_name}", param="model")


def check_generation_request(body: SamplingFields, state: Served) -> None:
    """What every generating route checks first: the model, and for an
    encoder-decoder model the fields that do not apply to it (``echo``: the
    source is not part of the output; ``decoder_input_ids``: the decoder
    starts from the model's own prompt). A pooling model generates nothing."""
    check_model(body.model, state)
    if state.pooling is not None:
        raise InvalidRequestError(
            f"The model `{state.model_name}` is a pooling model: it serves {state.pooling.routes}, not text generation",
            code="model_not_supported",
        )
    if state.encoder_decoder is None:
        return
    if getattr(body, "echo", False):
        raise InvalidRequestError(
            "echo is not supported by an encoder-decoder model: the prompt is the encoder's input, not part of the output", param="echo"
        )
    if (body.model_extra or {}).get("decoder_input_ids") is not None:
        raise InvalidRequestError(
            "decoder_input_ids are not supported: the decoder starts from the model's own start token", param="decoder_input_ids"
        )


def check_context(
    num_prompt_tokens: int, max_tokens: int, state: Served, max_tokens_param: str = "max_tokens", prompt_param: str = "prompt"
) -> None:
    """Prompt + max_tokens must fit the context window (400 naming both numbers
    and, as ``param``, the field the client sent: ``max_tokens_param`` when the
    prompt alone fits, else ``prompt_param``). For an encoder-decoder model
    the prompt is the encoder's and the output the decoder's: each fits its own."""
    if state.encoder_decoder is not None:
        _check_decoder_window(max_tokens, state, max_tokens_param)
        return
    if num_prompt_tokens + max_tokens > state.max_model_len:
        error = InvalidRequestError(
            f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or {max_tokens_param}.",
            param=max_tokens_param if num_prompt_tokens < state.max_model_len else prompt_param,
        )
        error.code = "context_length_exceeded"
        raise error


def _check_decoder_window(max_tokens: int, state: Served, max_tokens_param: str) -> None:
    """The decoder's window; the source's length is the engine's check (``EngineCore.make_request``)."""
    limit = state.max_model_len - len(state.encoder_decoder.decoder_prompt_token_ids)
    if max_tokens > limit:
        raise InvalidRequestError(
            f"This model's decoder writes at most {limit} tokens, but you requested {max_tokens}. Please reduce {max_tokens_param}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )


def default_max_tokens(num_prompt_tokens: int, state: Served) -> int:
    """The rest of the context window (and of the KV cache), as vLLM does;
    for an encoder-decoder model, the rest of the decoder's."""
    limit = min(state.max_model_len, state.batcher.kv_capacity_tokens)
    if state.encoder_decoder is not None:
        return max(limit - len(state.encoder_decoder.decoder_prompt_token_ids), 1)
    return max(limit - num_prompt_tokens, 1)
