"""One validated settings object for the server, from flags and environment.

Every field can be set as ``TOKENSTEP_<FIELD>`` (e.g. ``TOKENSTEP_PORT=9000``)
or as the flag ``--<field>`` (``server.cli`` builds the flags from these
fields: type, choices and help come from here); flags win over the
environment. Defaults suit a CPU laptop. The engine's fields take their
defaults and choice lists from ``batching.engine_config``, where each is
stated once; ``server.engine_builder.engine_config`` maps them to the
engine's frozen ``EngineConfig`` by name.
"""

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batching.engine_config import ACTIVATIONS, DEVICE_PATTERN, DTYPES, QUANTIZATIONS, TASKS, engine_default
from batching.scheduler_config import (
    CPU_KV_CACHE_MEMORY,
    CPU_TOKEN_BUDGET,
    CPU_TOKENS_PER_RUNNING_REQUEST,
    CUDA_KV_FRACTION,
    CUDA_TOKEN_BUDGET,
    DEFAULT_MAX_NUM_SEQS,
    DRAFT_MODEL_SPECULATIVE_TOKENS,
)
from server.reasoning import REASONING_PARSERS
from server.tool_formats import TOOL_CALL_PARSERS

LOG_LEVELS = ("debug", "info", "warning", "error")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENSTEP_", protected_namespaces=())

    model: str | None = Field(
        engine_default("model"), description="HF model directory, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct)"
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    # repr=False: the key never shows up in a logged or printed settings object.
    api_key: str | None = Field(None, repr=False, description="require 'Authorization: Bearer KEY' on /v1 routes")
    served_model_name: str | None = Field(None, description="the model's name in the API (default: the model folder's name)")
    max_num_seqs: int = Field(engine_default("max_num_seqs"), ge=1, description="most requests running at once")
    max_num_batched_tokens: int | None = Field(
        engine_default("max_num_batched_tokens"),
        ge=1,
        description=(
            f"token budget of one step (prefill + decode); default on CPU {CPU_TOKEN_BUDGET}, or "
            f"{CPU_TOKENS_PER_RUNNING_REQUEST} per running request when more "
            f"({CPU_TOKENS_PER_RUNNING_REQUEST * DEFAULT_MAX_NUM_SEQS} at {DEFAULT_MAX_NUM_SEQS} in flight); {CUDA_TOKEN_BUDGET} on CUDA; "
            "an encoder-decoder model's sources count whole, and a step's first admission may overrun the budget by its source"
        ),
    )
    block_size: int = Field(engine_default("block_size"), ge=1, le=1024, description="tokens per KV cache block")
    kv_cache_memory: str | None = Field(
        engine_default("kv_cache_memory"),
        description=(
            f"KV pool size, e.g. 512MiB, 2GiB or bytes (default {CPU_KV_CACHE_MEMORY} on CPU, {CUDA_KV_FRACTION:.0%} of free GPU "
            "memory on CUDA)"
        ),
    )
    max_model_len: int | None = Field(engine_default("max_model_len"), ge=1, description="context window (default: the model's)")
    dtype: Literal[DTYPES] = Field(engine_default("dtype"), description="the weights' dtype (auto: the checkpoint's, float32 on CPU)")
    device: str = Field(engine_default("device"), pattern=DEVICE_PATTERN, description="auto, cpu, cuda or cuda:N")
    quantization: Literal[QUANTIZATIONS] = Field(
        engine_default("quantization"),
        description=(
            "auto (default): gguf for a .gguf model or the default model on the CPU in float32, else none; "
            "gguf: a GGUF model's (or the default model's) own Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 blocks, "
            "served as stored; int8: weight-only int8 linears in groups of 32 (scale + offset each), quantized at "
            "load; both CPU and float32; none: the checkpoint's dtype (float32 on CPU: exactly generate's outputs)"
        ),
    )
    activations: Literal[ACTIVATIONS] = Field(
        engine_default("activations"),
        description=(
            "auto (default): int16 with --quantization gguf, else float32; int16 or int8: "
            "the quantized linears round their inputs per group of 32 to integers too, for integer dot products "
            "and a much faster decode; int16 stays very close to the float model's outputs, int8 (what llama.cpp "
            "does) moves them more; float32: the quantized weights' exact dequantized values (CPU, needs "
            "tokenstep's kernels)"
        ),
    )
    task: Literal[TASKS] = Field(
        engine_default("task"),
        description=(
            "what the model serves. auto (default): read off the checkpoint: a sentence-transformers or bare encoder "
            "checkpoint embeds (/v1/embeddings), a one-label *ForSequenceClassification checkpoint "
            "or a sentence-transformers LogitScore reranker scores text pairs "
            "(/v1/rerank, /v1/score), anything else generates; generate; embed (a causal LM without modules.json pools "
            "its last token, normalized, as vLLM does); score"
        ),
    )
    enable_prefix_caching: bool = Field(
        engine_default("enable_prefix_caching"), description="reuse the KV blocks of shared prompt prefixes"
    )
    compile: bool = Field(
        engine_default("compile"),
        description=(
            "compile the step forward whole with torch.compile (inductor; needs a C++ compiler): shorter steps, "
            "but 1-2 minutes more at start (less once inductor's cache is warm)"
        ),
    )
    enforce_eager: bool = Field(
        engine_default("enforce_eager"),
        description="CUDA: run every decode step eagerly instead of replaying the CUDA graphs captured at start",
    )
    num_speculative_tokens: int | None = Field(
        engine_default("num_speculative_tokens"),
        ge=0,
        le=16,
        description=(
            f"speculative decoding: draft tokens per greedy request per step, by n-gram lookup or from "
            f"--speculative-model (default 0 = off; {DRAFT_MODEL_SPECULATIVE_TOKENS} with a speculative model)"
        ),
    )
    speculative_model: str | None = Field(
        engine_default("speculative_model"),
        description=(
            "draft model (HF directory or hub id, same vocabulary) for speculative decoding; unset = n-gram "
            "lookup when --num-speculative-tokens > 0"
        ),
    )
    chat_template: str | None = Field(None, description="Jinja chat template file overriding the model's")
    tool_call_parser: Literal[TOOL_CALL_PARSERS] = Field(
        "auto",
        description=(
            "how the model writes tool calls: auto = from its chat template (gpt-oss harmony, Qwen3-Coder XML, "
            "Mistral [TOOL_CALLS], DeepSeek, Llama 3 JSON), else hermes <tool_call>"
        ),
    )
    reasoning_parser: Literal[REASONING_PARSERS] = Field(
        "auto",
        description=(
            "split a thinking model's <think> block from its answer (reasoning_content): auto = when the chat template "
            "handles </think>; think (or vLLM's names deepseek_r1, qwen3) always; none never"
        ),
    )
    max_request_bytes: int = Field(16 * 2**20, ge=1024, description="larger request bodies get 413")
    max_queue_len: int = Field(
        256, ge=1, description="most requests waiting to run (beyond free running slots); more get 503 + Retry-After"
    )
    max_stored_responses: int = Field(
        1024, ge=0, description="responses kept in memory for previous_response_id and GET /v1/responses/{id} (LRU; 0 = store nothing)"
    )
    request_timeout: float | None = Field(
        None, ge=0, description="seconds a request may take before it ends with 504 (streaming: an error event); unset or 0 = no limit"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds in-flight requests may still finish before they end with an error"
    )
    allowed_origins: str | None = Field(None, description="comma-separated CORS origins ('*' = any); unset = CORS off")
    log_level: Literal[LOG_LEVELS] = Field("info", description="how much the server logs")
    cache_dir: str | None = Field(
        engine_default("cache_dir"),
        description="where the converted default model and the compiled kernels live (default: the platform cache, ~/.cache/tokenstep)",
    )
    no_kernels: bool = Field(
        engine_default("no_kernels"), description="leave tokenstep's C++ kernels out and serve with plain PyTorch (slower)"
    )

    @field_validator("model", "speculative_model")
    @classmethod
    def _empty_model_is_the_default(cls, model: str | None) -> str | None:
        """``TOKENSTEP_MODEL=`` (compose passes unset variables through empty)
        means the embedded default, as leaving it out does; an empty
        ``TOKENSTEP_SPECULATIVE_MODEL=`` means none."""
        return model or None

    @property
    def allowed_origin_list(self) -> list[str]:
        """``allowed_origins`` split on commas; empty means CORS stays off."""
        return [origin.strip() for origin in (self.allowed_origins or "").split(",") if origin.strip()]
