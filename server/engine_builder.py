"""Wire a loaded model into a ready ``EngineCore``: runner, KV pool,
block manager and scheduler sized to match.

This is the one place that sees both layers whole: ``batching`` (scheduler,
block manager, engine core) and ``model_runtime`` (loading, the runner).
Neither layer imports the other's wiring; ``model_runtime`` sees only the
step messages. The CLI calls ``build_engine_core`` at start-up (in a worker
thread); tests and benchmarks call it with a loaded model."""

import logging
from dataclasses import dataclass
from pathlib import Path

from batching.block_manager import BlockManager
from batching.engine_core import EngineCore
from batching.request import EncoderDecoderPrompts
from batching.scheduler import Scheduler
from batching.scheduler_config import (
    CPU_KV_CACHE_MEMORY,
    CUDA_KV_FRACTION,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_NUM_SEQS,
    DRAFT_MODEL_SPECULATIVE_TOKENS,
    SchedulerConfig,
)
from model_runtime.encoder_decoder.step import decoder_prompt_token_ids
from model_runtime.kv_cache import free_device_bytes, parse_memory_size
from model_runtime.loading.loader import LoadedModel, load_model
from model_runtime.runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine was asked for (the serve flags, built once from the
    server's ``Settings``). None means "by device or model":
    ``resolve_defaults`` decides each such default, in one place.

    ``kv_cache_memory`` is a size (``"1GiB"``) or None; ``num_kv_blocks``
    overrides it exactly (used by tests to force preemption).
    """

    model: str | Path
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    # The GGUF file ``model`` was converted from (the default model's), for
    # ``quantization="gguf"``; a ``.gguf`` model is its own.
    gguf_file: str | Path | None = None
    # "int8": quantized linears quantize their inputs too (model_runtime.weights.int_activations).
    activations: str = "float32"
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: str | int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    # Speculative decoding: draft tokens per greedy request per step; from
    # n-gram lookup, or from ``speculative_model``.
    num_speculative_tokens: int | None = None
    speculative_model: str | Path | None = None
    # Compile the step forward whole (``model_runtime.step_graph``).
    compile: bool = False


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine's sizes with every default resolved (``resolve_defaults``)."""

    num_kv_blocks: int
    scheduler: SchedulerConfig
    max_model_len: int


def resolve_defaults(config: EngineConfig, loaded: LoadedModel, draft: LoadedModel | None = None) -> EngineLimits:
    """Every default that depends on the device or the model, decided here:
    the KV pool (``CPU_KV_CACHE_MEMORY`` on CPU, ``CUDA_KV_FRACTION`` of the
    free memory on CUDA; with a draft model each block is paid twice, the
    draft keeps a cache of the same blocks), the step budget
    (``SchedulerConfig.for_device``), the speculative method and draft
    length, and the context window (the model's, the draft's, the flag's,
    whichever is smallest)."""
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        if config.kv_cache_memory is not None:
            budget = parse_memory_size(config.kv_cache_memory)
        elif (free_bytes := free_device_bytes(loaded.device)) is not None:
            budget = int(free_bytes * CUDA_KV_FRACTION)
        else:
            budget = parse_memory_size(CPU_KV_CACHE_MEMORY)
        num_blocks = budget // ModelRunner.bytes_per_block(loaded, config.block_size, draft)
    num_speculative_tokens = config.num_speculative_tokens
    if num_speculative_tokens is None:
        num_speculative_tokens = DRAFT_MODEL_SPECULATIVE_TOKENS if draft is not None else 0
    scheduler = SchedulerConfig.for_device(
        loaded.device.type,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        num_speculative_tokens=num_speculative_tokens,
        speculative_method="draft_model" if draft is not None else "ngram",
    )
    # The draft model reads the same positions, so its window bounds ours too.
    model_max_len = min(loaded.max_model_len, draft.max_model_len) if draft is not None else loaded.max_model_len
    max_model_len = min(config.max_model_len or model_max_len, model_max_len)
    return EngineLimits(num_blocks, scheduler, max_model_len)


def load_draft_model(config: EngineConfig, loaded: LoadedModel) -> LoadedModel:
    """Load ``speculative_model`` like the target; its vocabulary must be the target's."""
    draft = load_model(config.speculative_model, config.dtype, config.device)
    check_draft_vocabulary(draft, loaded, str(config.speculative_model))
    return draft


def check_draft_vocabulary(draft: LoadedModel, loaded: LoadedModel, name: str) -> None:
    """Draft token ids must mean the same tokens and be valid target inputs."""
    if draft.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise ValueError(f"--speculative-model {name}: its tokenizer's vocabulary differs from the served model's")
    if draft.vocab_size > loaded.vocab_size:
        raise ValueError(f"--speculative-model {name}: vocab_size {draft.vocab_size} exceeds the served model's {loaded.vocab_size}")


def kv_window(loaded: LoadedModel, draft: LoadedModel | None = None) -> int | None:
    """How far back any layer reads, where every layer of the model (and of
    the draft model, which shares the block tables) slides: KV older than
    that goes back to the pool while a request runs. None: keep it all."""
    windows = [model.attention.kv_window if model.attention is not None else None for model in (loaded, draft) if model is not None]
    return max(windows) if all(windows) else None


def build_engine_core(config: EngineConfig, loaded: LoadedModel | None = None, draft: LoadedModel | None = None) -> EngineCore:
    loaded = loaded or load_model(config.model, config.dtype, config.device, config.quantization, config.gguf_file, config.activations)
    if loaded.family is not None and config.speculative_model is not None:
        raise ValueError(
            "--speculative-model serves decoder-only models; n-gram speculation (--num-speculative-tokens) works "
            "with encoder-decoder models"
        )
    if draft is None and config.speculative_model is not None:
        draft = load_draft_model(config, loaded)
    limits = resolve_defaults(config, loaded, draft)
    compile_max_tokens = limits.scheduler.max_step_tokens if config.compile else None
    runner = ModelRunner(loaded, limits.num_kv_blocks, config.block_size, draft, compile_max_tokens)
    block_manager = BlockManager(runner.num_blocks, config.block_size, config.enable_prefix_caching, kv_window(loaded, draft))
    return EngineCore(
        Scheduler(limits.scheduler, block_manager),
        runner,
        loaded.tokenizer,
        eos_token_ids=loaded.eos_token_ids,
        vocab_size=loaded.vocab_size,
        max_model_len=limits.max_model_len,
        encoder_decoder=EncoderDecoderPrompts(decoder_prompt_token_ids(loaded.model), limits.max_model_len) if loaded.family else None,
    )
