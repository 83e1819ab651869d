"""Wire a loaded model into a ready ``EngineCore``: runner, KV pool,
block manager and scheduler sized to match."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from batching.block_manager import BlockManager
from batching.engine_core import EngineCore
from batching.scheduler import Scheduler, SchedulerConfig
from model_runtime.kv_cache import CacheShape, parse_memory_size
from model_runtime.loader import LoadedModel, load_model
from model_runtime.runner import ModelRunner

logger = logging.getLogger(__name__)

# On CUDA with no explicit budget, the KV pool takes this share of free memory.
# Default step token budgets. On 2 CPU cores a small budget keeps prefill chunks
# from stalling decodes: W1 (16 in flight) measured 128 vs 512 tokens: same
# throughput (100 vs 104 tok/s), TTFT p50 1.10 vs 1.39 s, ITL p99 284 vs 655 ms.
CPU_TOKEN_BUDGET = 128
CUDA_TOKEN_BUDGET = 2048
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
    block_size: int = 16
    kv_cache_memory: str | int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    num_speculative_tokens: int = 0


def kv_cache_bytes(config: EngineConfig, loaded: LoadedModel) -> int:
    shape = CacheShape.from_config(loaded.model.config, loaded.dtype)
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks * config.block_size * shape.bytes_per_token()
    if config.kv_cache_memory is not None:
        return parse_memory_size(config.kv_cache_memory)
    if loaded.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(loaded.device)
        return int(free_bytes * CUDA_KV_FRACTION)
    return parse_memory_size("1GiB")


def build_engine_core(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineCore:
    loaded = loaded or load_model(config.model, config.dtype, config.device)
    runner = ModelRunner(loaded, kv_cache_bytes(config, loaded), config.block_size)
    default_budget = CUDA_TOKEN_BUDGET if loaded.device.type == "cuda" else CPU_TOKEN_BUDGET
    block_manager = BlockManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(
        SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens or default_budget, config.num_speculative_tokens), block_manager
    )
    max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
    return EngineCore(
        scheduler,
        runner,
        loaded.tokenizer,
        eos_token_ids=loaded.eos_token_ids,
        vocab_size=loaded.model.config.vocab_size,
        max_model_len=max_model_len,
    )
