"""The batcher's ``EngineStats`` snapshot, as ``/metrics`` reads it, on the real tiny engine."""

import json

import httpx
import pytest

from tests.server.asgi_stream import StreamingASGITransport
from tests.server.conftest import BASE_URL, MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the engine_app fixture's loop


async def test_snapshot_tracks_a_running_request_and_the_counters(engine_app):
    before = engine_app.batcher.stats()
    body = {"model": MODEL_NAME, "prompt": "count the steps", "max_tokens": 12, "ignore_eos": True, "stream": True}
    during = None
    # The streaming transport hands events over as they are sent, so the snapshot is taken mid-request.
    async with httpx.AsyncClient(transport=StreamingASGITransport(engine_app.app), base_url=BASE_URL, timeout=30) as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if during is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    during = engine_app.batcher.stats()
    after = engine_app.batcher.stats()
    assert during is not None and during.num_running == 1 and during.kv_cache_usage > 0
    assert after.num_running == 0 and after.num_waiting == 0
    assert after.num_generation_tokens_total - before.num_generation_tokens_total == 12
    assert after.num_prompt_tokens_total > before.num_prompt_tokens_total
    assert after.num_steps_total - before.num_steps_total >= 12 and after.step_seconds_total > before.step_seconds_total
    assert after.kv_capacity_tokens == engine_app.batcher.kv_capacity_tokens
    metrics = (await engine_app.client.get("/metrics")).text
    assert f"tokenstep_engine_steps_total {float(engine_app.batcher.stats().num_steps_total)}" in metrics
