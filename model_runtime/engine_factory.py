"""Wire a loaded model into a ready ``EngineCore``: runner, KV pool,
block manager and scheduler sized to match."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from batching.block_manager import BlockManager
from batching.engine_core import EngineCore
from batching.scheduler import Scheduler
from batching.scheduler_config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_SEQS, SchedulerConfig
from model_runtime.kv_cache import parse_memory_size
from model_runtime.loader import LoadedModel, load_model
from model_runtime.runner import ModelRunner

logger = logging.getLogger(__name__)

# On CUDA with no explicit budget, the KV pool takes this share of free memory.
CUDA_KV_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything needed to build an engine; mirrors the CLI flags.

    ``kv_cache_memory`` is a size (``"1GiB"``) or None for the default (1 GiB
    on CPU, 80 % of free memory on CUDA). ``num_kv_blocks`` overrides it
    exactly (used by tests to force preemption).
    """

    model: str | Path
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: str | int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None  # None: by device (SchedulerConfig.for_device)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    # Speculative decoding: draft tokens per greedy request per step; from
    # n-gram lookup, or from ``speculative_model`` (then None means 4).
    num_speculative_tokens: int | None = None
    speculative_model: str | Path | None = None


DEFAULT_DRAFT_MODEL_TOKENS = 4


def num_kv_blocks(config: EngineConfig, loaded: LoadedModel, draft: LoadedModel | None = None) -> int:
    """Blocks the KV budget buys; with a draft model each block is paid twice
    (the draft keeps a cache of the same blocks)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory is not None:
        budget = parse_memory_size(config.kv_cache_memory)
    elif loaded.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(loaded.device)
        budget = int(free_bytes * CUDA_KV_FRACTION)
    else:
        budget = parse_memory_size("1GiB")
    return budget // ModelRunner.bytes_per_block(loaded, config.block_size, draft)


def load_draft_model(config: EngineConfig, loaded: LoadedModel) -> LoadedModel:
    """Load ``speculative_model`` like the target; its vocabulary must be the target's."""
    draft = load_model(config.speculative_model, config.dtype, config.device)
    check_draft_vocabulary(draft, loaded, str(config.speculative_model))
    return draft


def check_draft_vocabulary(draft: LoadedModel, loaded: LoadedModel, name: str) -> None:
    """Draft token ids must mean the same tokens and be valid target inputs."""
    if draft.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise ValueError(f"--speculative-model {name}: its tokenizer's vocabulary differs from the served model's")
    if draft.model.config.vocab_size > loaded.model.config.vocab_size:
        raise ValueError(
            f"--speculative-model {name}: vocab_size {draft.model.config.vocab_size} "
            f"exceeds the served model's {loaded.model.config.vocab_size}"
        )


def build_engine_core(config: EngineConfig, loaded: LoadedModel | None = None, draft: LoadedModel | None = None) -> EngineCore:
    loaded = loaded or load_model(config.model, config.dtype, config.device)
    if draft is None and config.speculative_model is not None:
        draft = load_draft_model(config, loaded)
    runner = ModelRunner(loaded, num_kv_blocks(config, loaded, draft), config.block_size, draft)
    block_manager = BlockManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)
    num_speculative_tokens = config.num_speculative_tokens
    if num_speculative_tokens is None:
        num_speculative_tokens = DEFAULT_DRAFT_MODEL_TOKENS if draft is not None else 0
    scheduler_config = SchedulerConfig.for_device(
        loaded.device.type,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        num_speculative_tokens=num_speculative_tokens,
        speculative_method="draft_model" if draft is not None else "ngram",
    )
    scheduler = Scheduler(scheduler_config, block_manager)
    # The draft model reads the same positions, so its window bounds ours too.
    model_max_len = min(loaded.max_model_len, draft.max_model_len) if draft is not None else loaded.max_model_len
    max_model_len = min(config.max_model_len or model_max_len, model_max_len)
    return EngineCore(
        scheduler,
        runner,
        loaded.tokenizer,
        eos_token_ids=loaded.eos_token_ids,
        vocab_size=loaded.model.config.vocab_size,
        max_model_len=max_model_len,
    )
