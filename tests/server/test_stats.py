"""The batcher's ``EngineStats`` snapshot, as ``/metrics`` reads it, on the real tiny engine."""

import json

import httpx
import pytest

from tests.server.asgi_stream import StreamingASGITransport
from tests.server.conftest import BASE_URL, MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the engine_app fixture's loop


async def mid_request(engine_app, read):
    """``await read(client)`` once a 12-token streamed completion has sent its
    first text: the streaming transport hands events over as they are sent,
    so it runs mid-request."""
    body = {"model": MODEL_NAME, "prompt": "count the steps", "max_tokens": 12, "ignore_eos": True, "stream": True}
    during = None
    async with httpx.AsyncClient(transport=StreamingASGITransport(engine_app.app), base_url=BASE_URL, timeout=30) as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if during is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    during = await read(client)
    return during


async def test_snapshot_tracks_a_running_request_and_the_counters(engine_app):
    before = engine_app.batcher.stats()

    async def snapshot(client: httpx.AsyncClient):
        return engine_app.batcher.stats()

    during = await mid_request(engine_app, snapshot)
    after = engine_app.batcher.stats()
    assert during is not None and during.num_running == 1 and during.kv_cache_usage > 0
    assert after.num_running == 0 and after.num_waiting == 0
    assert after.num_generation_tokens_total - before.num_generation_tokens_total == 12
    assert after.num_prompt_tokens_total > before.num_prompt_tokens_total
    assert after.num_steps_total - before.num_steps_total >= 12 and after.step_seconds_total > before.step_seconds_total
    assert after.kv_capacity_tokens == engine_app.batcher.kv_capacity_tokens
    metrics = (await engine_app.client.get("/metrics")).text
    assert f"tokenstep_engine_steps_total {float(engine_app.batcher.stats().num_steps_total)}" in metrics


async def test_stats_route_shows_the_running_request_its_blocks_and_the_steps(engine_app):
    """``GET /stats`` (the dashboard's data) mid-request: a decoding row, blocks
    in use on the map, recent steps; and the model's identity."""

    async def stats(client: httpx.AsyncClient) -> dict:
        return (await client.get("/stats")).json()

    during = await mid_request(engine_app, stats)
    assert during["model"]["id"] == MODEL_NAME and during["model"]["chat_template"] is True and during["model"]["encoder_decoder"] is False
    assert during["running"] == 1 and during["requests"][0]["state"] == "decoding"
    assert during["requests"][0]["prompt_tokens"] > 0 and during["requests"][0]["blocks"] >= 1
    kv = during["kv"]
    assert len(kv["map"]) == kv["blocks"] and kv["map"].count("u") == during["requests"][0]["blocks"]
    assert set(kv["map"]) <= {"u", "c", "."}
    assert during["steps"] and all(step["t"] <= 0 and step["steps"] >= 1 for step in during["steps"])
    after = (await engine_app.client.get("/stats")).json()
    assert after["running"] == 0 and after["requests"] == [] and "u" not in after["kv"]["map"]
