"""What readers outside the batching layer see of a running engine, built
on demand from the ``EngineCore``: ``engine_stats`` (gauges and counters,
for ``/metrics``) and ``engine_view`` (that, plus every request's row, the
block map and the recent steps, for ``/stats`` and the dashboard).

They run on the event loop's thread while a step may run on the model
thread, so they copy each list before walking it (one C-level copy, which
no other Python thread can interleave): a snapshot may be a step behind in
places, never an error.
"""

import time

from batching.engine_core import EngineCore
from batching.request import Request, RequestStatus
from batching.stats import BLOCK_CACHED, BLOCK_FREE, BLOCK_USED, EngineStats, EngineView, RequestRow

STEP_HISTORY_S = 300.0  # how far back engine_view reports steps


def engine_stats(core: EngineCore, num_pending: int) -> EngineStats:
    """A snapshot of the engine's gauges and counters; ``num_pending``: the
    requests accepted but not yet handed to the scheduler."""
    scheduler, block_manager = core.scheduler, core.scheduler.block_manager
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting) + num_pending,
        kv_cache_usage=block_manager.usage,
        num_kv_blocks=block_manager.num_blocks,
        block_size=block_manager.block_size,
        num_prompt_tokens_total=core.num_prompt_tokens_total,
        num_generation_tokens_total=core.num_generation_tokens_total,
        num_preemptions_total=scheduler.num_preemptions,
        prefix_cache_query_tokens_total=scheduler.num_prefix_query_tokens,
        prefix_cache_hit_tokens_total=scheduler.num_prefix_hit_tokens,
        spec_draft_tokens_total=scheduler.num_draft_tokens,
        spec_accepted_tokens_total=scheduler.num_accepted_tokens,
        num_steps_total=core.num_steps,
        step_seconds_total=core.step_seconds_total,
        num_pooled_total=core.num_pooled_total,
    )


def engine_view(core: EngineCore, num_pending: int) -> EngineView:
    """``engine_stats`` and what a live view draws: every request's row
    (running first), the block map and the steps of the last ``STEP_HISTORY_S``."""
    scheduler = core.scheduler
    rows = [_row(request, _running_state(request)) for request in list(scheduler.running)]
    rows += [_row(request, "preempted" if request.status == RequestStatus.PREEMPTED else "waiting") for request in list(scheduler.waiting)]
    since = time.monotonic() - STEP_HISTORY_S
    steps = [step for step in list(core.step_records) if step.end_time >= since]
    block_map = scheduler.block_manager.block_map(BLOCK_FREE, BLOCK_CACHED, BLOCK_USED)
    return EngineView(engine_stats(core, num_pending), rows, block_map, steps)


def _running_state(request: Request) -> str:
    if request.pooling is not None:
        return "pooling"  # its whole input in this step; it leaves with its vector
    return "prefill" if request.num_computed_tokens < request.num_tokens - 1 else "decoding"


def _row(request: Request, state: str) -> RequestRow:
    num_blocks = len(request.block_ids) + len(request.cross_block_ids)
    num_prompt_tokens = request.num_prompt_tokens + request.num_encoder_tokens
    return RequestRow(request.request_id, state, num_prompt_tokens, request.num_output_tokens, request.num_computed_tokens, num_blocks)
