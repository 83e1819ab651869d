"""Wire a loaded model into a ready ``EngineCore``: runner, KV pool,
block manager and scheduler sized to match.

This is the one place that sees both layers whole: ``batching`` (scheduler,
block manager, engine core) and ``model_runtime`` (loading, the runner).
Neither layer imports the other's wiring; ``model_runtime`` sees only the
step messages. The CLI calls ``build_engine_core`` at start-up (in a worker
thread); tests and benchmarks call it with a loaded model."""

import logging
from dataclasses import dataclass, fields
from pathlib import Path

from batching.block_manager import BlockManager
from batching.engine_config import EngineConfig
from batching.engine_core import EngineCore
from batching.pooling_params import PoolingModel
from batching.request import EncoderDecoderPrompts
from batching.scheduler import Scheduler
from batching.scheduler_config import (
    CPU_KV_CACHE_MEMORY,
    CUDA_KV_FRACTION,
    DRAFT_MODEL_SPECULATIVE_TOKENS,
    POOLING_TOKEN_BUDGET,
    SchedulerConfig,
)
from model_runtime import kernels, paths
from model_runtime.cuda_graphs import GraphLimits
from model_runtime.encoder_decoder.step import decoder_prompt_token_ids
from model_runtime.kv_cache import free_device_bytes, parse_memory_size
from model_runtime.loading.default_model import DEFAULT_MODEL_NAME, default_gguf_file, default_model_converted, default_model_dir
from model_runtime.loading.loader import LoadedModel, held_bytes, load_model, return_freed_heap
from model_runtime.pooling.runner import PoolingRunner
from model_runtime.runner import ModelRunner
from server.settings import Settings

logger = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    """The one mapping from the server's settings to the engine's config:
    every ``EngineConfig`` field that ``Settings`` has, by name."""
    given = {field.name: getattr(settings, field.name) for field in fields(EngineConfig) if field.name in Settings.model_fields}
    return EngineConfig(**given)


def configure_runtime(config: EngineConfig) -> None:
    """Hand ``model_runtime`` its machine-wide options before it loads or builds anything."""
    paths.configure(config.cache_dir)
    if config.no_kernels:
        kernels.disable()


def model_path(config: EngineConfig) -> str | Path:
    """The model to load: the configured one, or the embedded default (converted once)."""
    return config.model if config.model is not None else default_model_dir()


def served_model_name(config: EngineConfig) -> str:
    """The name the API serves the model as, unless ``--served-model-name`` says otherwise."""
    return DEFAULT_MODEL_NAME if config.model is None else Path(str(config.model).rstrip("/")).name


def prepare(config: EngineConfig) -> str:
    """Build the kernels and convert the default model into the cache ahead
    of the first start (``tokenstep prepare``: ``make venv``, the image build)."""
    configure_runtime(config)
    kernels.load_in_background()  # compiled while the default model converts
    model_dir = default_model_dir()
    ops = kernels.load()
    built = "not built (plain PyTorch will be used)" if ops is None else f"{kernels.library_path()} ({', '.join(ops.isas())})"
    return f"kernels: {built}\ndefault model: {model_dir}"


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


def serving_line(loaded: LoadedModel, runner: ModelRunner, compile_requested: bool) -> str:
    """One line of what serves, for the start log: the linears' weights and
    activations, tokenstep's kernels, where decode attention runs, and the
    compile mode, each with why it fell back where it did."""
    if runner.compiled is not None:
        compiled = "on (the step forward, compiled at start)"
    elif compile_requested:
        compiled = f"eager ({runner.model_step.eager_reason or 'no compiled step'})"
    else:
        compiled = "off (eager; --compile compiles the step forward)"
    if runner.decode_graphs is not None:
        attention = f"Triton paged kernels, decode steps from CUDA graphs of up to {runner.decode_graphs.sizes[-1]} rows"
    elif runner.triton_attention:
        attention = "Triton paged kernels"
    elif runner.decode_kernel:
        attention = "tokenstep's decode kernel"
    else:
        attention = "gather + PyTorch SDPA / math"
    return (
        f"weights {loaded.weights}, {held_bytes(loaded.model) / 2**20:.0f} MiB held; activations {loaded.activations}; "
        f"kernels {kernels.describe(loaded.model)}; "
        f"decode attention {attention}; compile {compiled}"
    )


def build_engine_core(config: EngineConfig, loaded: LoadedModel | None = None, draft: LoadedModel | None = None) -> EngineCore:
    """The engine for ``config``, loading the model (and the draft model)
    unless given one."""
    if loaded is None:
        configure_runtime(config)
        if config.model is None and not default_model_converted():
            kernels.load_in_background()  # a first start: the default serves them; compiled while its model converts
        gguf_file = config.gguf_file
        if gguf_file is None and config.model is None and config.quantization in ("gguf", "auto"):
            gguf_file = default_gguf_file()  # the default model serves its own blocks
        loaded = load_model(
            model_path(config), config.dtype, config.device, config.quantization, gguf_file, config.activations, config.task
        )
    if loaded.pooling is not None:
        return build_pooling_engine_core(config, loaded)
    if loaded.family is not None and config.speculative_model is not None:
        raise ValueError(
            "--speculative-model serves decoder-only models; n-gram speculation (--num-speculative-tokens) works "
            "with encoder-decoder models"
        )
    if draft is None and config.speculative_model is not None:
        draft = load_draft_model(config, loaded)
    limits = resolve_defaults(config, loaded, draft)
    compile_max_tokens = limits.scheduler.max_step_tokens if config.compile else None
    graphs = None if config.enforce_eager else GraphLimits(limits.scheduler.max_num_seqs, limits.max_model_len)
    runner = ModelRunner(loaded, limits.num_kv_blocks, config.block_size, draft, compile_max_tokens, graphs)
    return_freed_heap()  # what the kernel probes and the warm-up steps freed
    logger.info("serving: %s", serving_line(loaded, runner, config.compile))
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


def build_pooling_engine_core(config: EngineConfig, loaded: LoadedModel) -> EngineCore:
    """A pooling model's engine: the same scheduler and core, whose requests
    run whole, one step each, on a ``PoolingRunner``; no KV pool (its encoder
    keeps nothing between steps), so the block manager holds no blocks."""
    if config.speculative_model is not None or config.num_speculative_tokens or config.compile:
        raise ValueError("--speculative-model, --num-speculative-tokens and --compile serve generative models; this is a pooling model")
    budget = config.max_num_batched_tokens or POOLING_TOKEN_BUDGET
    scheduler = SchedulerConfig.for_device(loaded.device.type, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget)
    max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
    runner = PoolingRunner(loaded.model, loaded.pooling, loaded.tokenizer.pad_token_id, loaded.device)
    pooling = PoolingModel(loaded.pooling.task, loaded.num_pooled_values, loaded.is_matryoshka, loaded.pooling.pair_messages)
    logger.info(
        "serving: a pooling model (%s), %d values per input, %s; weights %s, %.0f MiB held; no KV cache",
        pooling.routes,
        loaded.num_pooled_values,
        loaded.pooling.describe(),
        loaded.weights,
        held_bytes(loaded.model) / 2**20,
    )
    return EngineCore(
        Scheduler(scheduler, BlockManager(0, config.block_size, enable_prefix_caching=False)),
        runner,
        loaded.tokenizer,
        vocab_size=loaded.vocab_size,
        max_model_len=max_model_len,
        pooling=pooling,
    )
