"""``EngineStats``: a frozen snapshot of what the engine is doing, for readers
outside the batching layer (``/metrics``, and any dashboard or health view);
``EngineView`` adds what a live view draws (``/stats`` and ``/dashboard``):
each request's row, the KV pool block by block and the recent steps.

``batching.views`` builds them on demand from the engine core (through
``DynamicBatcher.stats`` and ``view``), so readers never reach into the
scheduler, the block manager or the engine core. Plain ints and floats only.
"""

from dataclasses import dataclass, field


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
    num_pooled_total: int = 0  # pooling requests (embedding inputs) answered with a vector

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One request as the dashboard lists it. ``state``: ``prefill`` (its
    prompt is being computed, chunk by chunk), ``decoding``, ``waiting`` or
    ``preempted`` (waiting to be recomputed)."""

    request_id: str
    state: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step: when it ended (monotonic seconds), the tokens it
    computed, the tokens it added to outputs, and its time."""

    end_time: float
    num_tokens: int
    num_generated: int
    seconds: float


# Block map letters: free and empty, free but cached for prefix reuse, in use.
BLOCK_FREE, BLOCK_CACHED, BLOCK_USED = ".", "c", "u"


@dataclass(frozen=True, slots=True)
class EngineView:
    """``stats`` plus the requests (running first, then the queue), the block
    map (one letter per block: ``BLOCK_FREE``, ``BLOCK_CACHED``,
    ``BLOCK_USED``) and the steps of the last few minutes, oldest first."""

    stats: EngineStats
    requests: list[RequestRow] = field(default_factory=list)
    block_map: str = ""
    steps: list[StepRecord] = field(default_factory=list)
