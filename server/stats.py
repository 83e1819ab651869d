"""``GET /stats``: the engine's live state as JSON, the data the dashboard
(``server.pages``) polls about once a second.

Built from the batcher's ``EngineView`` snapshot (plain data: counters, the
KV block map, one row per request, recent ``StepRecord``s); the step records
are folded into one-second buckets here. Like every API route, it requires
the key under ``--api-key``.
"""

import time
from collections import defaultdict

from fastapi import APIRouter, Depends

from batching.stats import EngineView, StepRecord
from server.state import Served, served

STEPS_WINDOW_S = 300  # the dashboard's charts: the last five minutes, per second

router = APIRouter()


@router.get("/stats", summary="The engine's live state: the dashboard's data")
async def stats(state: Served = Depends(served)) -> dict:
    return stats_body(state, state.batcher.view())


def stats_body(state: Served, view: EngineView) -> dict:
    engine = view.stats
    query, hits = engine.prefix_cache_query_tokens_total, engine.prefix_cache_hit_tokens_total
    drafts, accepted = engine.spec_draft_tokens_total, engine.spec_accepted_tokens_total
    return {
        "model": {
            "id": state.model_name,
            "max_model_len": state.max_model_len,
            "chat_template": bool(state.chat_template or getattr(state.tokenizer, "chat_template", None)),
            "encoder_decoder": state.encoder_decoder is not None,
            "task": state.pooling.task if state.pooling is not None else "generate",
        },
        "running": engine.num_running,
        "waiting": engine.num_waiting,
        "preemptions": engine.num_preemptions_total,
        "kv": {"blocks": engine.num_kv_blocks, "block_size": engine.block_size, "usage": engine.kv_cache_usage, "map": view.block_map},
        "requests": [
            {
                "id": row.request_id,
                "state": row.state,
                "prompt_tokens": row.num_prompt_tokens,
                "output_tokens": row.num_output_tokens,
                "computed_tokens": row.num_computed_tokens,
                "blocks": row.num_blocks,
            }
            for row in view.requests
        ],
        "steps": per_second(view.steps, time.monotonic()),
        "prefix_cache": {"query_tokens": query, "hit_tokens": hits, "hit_rate": hits / query if query else None},
        "speculative": {"draft_tokens": drafts, "accepted_tokens": accepted, "acceptance_rate": accepted / drafts if drafts else None},
        "totals": {
            "steps": engine.num_steps_total,
            "prompt_tokens": engine.num_prompt_tokens_total,
            "generation_tokens": engine.num_generation_tokens_total,
            "pooled_requests": engine.num_pooled_total,
        },
    }


def per_second(steps: list[StepRecord], now: float) -> list[dict]:
    """The steps of the last ``STEPS_WINDOW_S`` in one-second buckets, ``t``
    seconds before ``now`` (negative): steps, mean tokens per step, mean step
    time, tokens generated."""
    buckets: dict[int, list[StepRecord]] = defaultdict(list)
    for step in steps:
        age = int(now - step.end_time)
        if age < STEPS_WINDOW_S:
            buckets[age].append(step)
    return [
        {
            "t": -age,
            "steps": len(group),
            "tokens_per_step": sum(s.num_tokens for s in group) / len(group),
            "step_ms": 1000 * sum(s.seconds for s in group) / len(group),
            "generated": sum(s.num_generated for s in group),
        }
        for age, group in sorted(buckets.items(), reverse=True)
    ]
