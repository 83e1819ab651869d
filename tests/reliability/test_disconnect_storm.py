"""Disconnect storm: 100 concurrent greedy streams, half of them abandoned at
random moments (before the response starts, right after the headers, or
after a random number of events). The others must carry exactly the text
each prompt produces alone, and afterwards the engine holds nothing:
``/metrics`` shows 0 running, 0 waiting and KV usage 0."""

import asyncio
import os
import random

import httpx
import pytest

from tests.reliability.support import parse_stream, wait_engine_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

NUM_STREAMS = 100
MAX_TOKENS = 16
SEED = int(os.environ.get("TOKENSTEP_STORM_SEED", "20240605"))


def body(index: int, stream: bool) -> dict:
    prompt = f"Storm request {index}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + index % 4])
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}


async def stream_or_hang_up(client: httpx.AsyncClient, index: int, hang_up_after_events: int | None) -> str | None:
    """Read a stream to its end (return its raw body) or hang up after N events."""
    async with client.stream("POST", "/v1/completions", json=body(index, stream=True)) as response:
        assert response.status_code == 200
        raw, num_events = "", 0
        async for line in response.aiter_lines():
            raw += line + "\n"
            num_events += line.startswith("data:")
            if hang_up_after_events is not None and num_events >= hang_up_after_events:
                return None  # leaving the block closes the connection
        return raw


async def cancelled_after(task: asyncio.Task, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    task.cancel()


async def test_disconnect_storm(storm_server):
    rng = random.Random(SEED)
    kept = sorted(rng.sample(range(NUM_STREAMS), NUM_STREAMS // 2))
    limits = httpx.Limits(max_connections=NUM_STREAMS + 8, max_keepalive_connections=NUM_STREAMS + 8)
    async with httpx.AsyncClient(base_url=storm_server.base_url, timeout=60, limits=limits) as client:
        tasks, cancellers = {}, []
        for index in range(NUM_STREAMS):
            style = "keep" if index in kept else rng.choice(["cancel", "events"])
            hang_up = None if style != "events" else rng.randint(0, MAX_TOKENS - 1)  # 0: right after the headers
            tasks[index] = asyncio.create_task(stream_or_hang_up(client, index, hang_up))
            if style == "cancel":  # may land before the response starts, mid-prefill or mid-decode
                cancellers.append(asyncio.create_task(cancelled_after(tasks[index], rng.uniform(0.0, 0.3))))
        await asyncio.gather(*cancellers)
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        raw_by_index = dict(zip(tasks, outcomes))

        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                raise outcome
        completed = [index for index, outcome in raw_by_index.items() if isinstance(outcome, str)]
        assert set(kept) <= set(completed)  # (a late cancel may find its stream already done)
        assert await wait_engine_idle(client) == [0.0, 0.0, 0.0], "requests or KV blocks still held after the storm"

        for index in kept:
            result = parse_stream(200, raw_by_index[index])
            result.assert_ended_properly()
            assert not result.errors and result.finish_reasons == ["length"]
            alone = await client.post("/v1/completions", json=body(index, stream=False))
            assert result.text == alone.json()["choices"][0]["text"], f"stream {index} differs from its solo run"
        assert await wait_engine_idle(client) == [0.0, 0.0, 0.0]
