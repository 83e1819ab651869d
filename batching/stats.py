"""``EngineStats``: a frozen snapshot of what the engine is doing, for readers
outside the batching layer (``/metrics``, and any dashboard or health view).

The batcher builds it on demand from its own counters (``DynamicBatcher.stats``),
on the event loop's thread, so readers never reach into the scheduler, the
block manager or the engine core, and never see a half-updated state.
Plain ints and floats only.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Gauges (now) and counters (since start). ``kv_cache_usage`` is the
    fraction (0-1) of the ``num_kv_blocks`` blocks of ``block_size`` tokens
    in use; prefix counters are in tokens."""

    num_running: int
    num_waiting: int  # in the scheduler's queue or accepted and not yet handed to it
    kv_cache_usage: float
    num_kv_blocks: int
    block_size: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_preemptions_total: int
    prefix_cache_query_tokens_total: int
    prefix_cache_hit_tokens_total: int
    spec_draft_tokens_total: int
    spec_accepted_tokens_total: int
    num_steps_total: int
    step_seconds_total: float  # wall time of the model steps (in the worker thread)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size
