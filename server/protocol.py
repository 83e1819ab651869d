"""OpenAI wire schemas (pydantic) for the completion and chat routes.

Standard fields follow OpenAI's API reference; sampling extensions follow
vLLM's spelling (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``min_tokens``, ``stop_token_ids``, ``skip_special_tokens``). Unknown fields
are accepted and ignored, as OpenAI-compatible servers do; fields whose
meaning tokenstep cannot honour are rejected by the routes with a 400.
"""

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StrictInt, field_serializer, model_serializer

from batching.sampling_params import MAX_TEMPERATURE

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024  # entries; each one is work in every step's sampler
REASONING_FIELDS = ("reasoning_content", "reasoning")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's structured-output schema."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema; omitted: any JSON object")
    strict: bool | None = Field(None, description="accepted; output always follows the schema")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model name (optional)")
    temperature: float | None = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description=f"token id (as a string) -> bias in [-100, 100]; at most {MAX_LOGIT_BIAS} entries"
    )
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, description="vLLM: keep the k most likely tokens (0 or -1: off)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM: drop tokens below min_p x the top probability")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="vLLM: >1 discourages repeating prompt/output tokens")
    ignore_eos: bool | None = Field(False, description="vLLM: keep generating past EOS")
    min_tokens: int | None = Field(0, ge=0, description="vLLM: EOS and stop tokens are banned before this many tokens")
    stop_token_ids: list[int] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description=f"vLLM: token ids that end generation (at most {MAX_STOP_TOKEN_IDS})"
    )
    skip_special_tokens: bool = True
    # Structured output (OpenAI's response_format; vLLM's guided_* extensions)
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON schema the output must follow")
    guided_regex: str | None = Field(None, description="vLLM: a regex the whole output must match")
    guided_choice: list[str] | None = Field(None, min_length=1, description="vLLM: the output is exactly one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM: a Lark grammar (llguidance dialect) the output must follow")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's ``continuous_usage_stats``: usage so far in every chunk (with ``include_usage``)."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description="a string, strings, token ids or lists of token ids"
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, description="not supported: a non-empty suffix is a 400")
    best_of: int | None = Field(None, ge=1, description="only best_of == n is supported")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int  # the arrival time (unix seconds), set by the route
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatTemplateFields(BaseModel):
    """How a conversation is rendered into a prompt: tools and template options
    (shared by /v1/chat/completions and /tokenize, so both render alike)."""

    model_config = ConfigDict(extra="allow")

    tools: list[dict[str, Any]] | None = Field(
        None, description="functions the model may call: [{'type': 'function', 'function': {'name', 'description', 'parameters'}}]"
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'auto' (default with tools), 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call with tool_choice 'required'")
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


MAX_REASONING_TOKENS_DESCRIPTION = (
    "tokenstep: thinking tokens after which a thinking model's block is closed (the end tag forced); "
    "only where the model has a reasoning parser"
)


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_reasoning_tokens: int | None = Field(None, ge=1, description=MAX_REASONING_TOKENS_DESCRIPTION)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="omitted: the rest of the context window")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON string")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """``reasoning_content`` (and the same text as ``reasoning``, vLLM's newer
    name) only when the served model has a reasoning parser."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _without_absent_reasoning(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        for name in REASONING_FIELDS:
            if dumped.get(name) is None:
                dumped.pop(name, None)
        return dumped


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int  # the arrival time (unix seconds), set by the route
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    """What one chunk adds to a choice's message; fields left None are not sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @field_serializer("delta")
    def _delta_without_nones(self, delta: DeltaMessage) -> dict[str, Any]:
        return delta.model_dump(mode="json", exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    def to_json(self) -> str:
        """The SSE payload; ``usage`` only on the usage chunk, as OpenAI sends it."""
        return self.model_dump_json(exclude={"usage"} if self.usage is None else None)


def model_dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
