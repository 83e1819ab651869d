"""Overload: past ``--max-queue-len`` new requests get 503 with ``Retry-After``
and an OpenAI-style error, before anything is queued; everything admitted
completes in full; the server is healthy afterwards."""

import asyncio
from pathlib import Path

import httpx
import pytest

from model_runtime.loading.loader import LoadedModel
from tests.reliability.conftest import API_KEY, SMALL_MAX_NUM_SEQS, SMALL_QUEUE_LEN
from tests.reliability.support import assert_openai_error, build_served, in_process, metric, parse_stream, wait_engine_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 96  # ~0.3 s per pair of running requests: nothing finishes during the burst
NUM_REQUESTS = 16
HANG_GUARD_S = 30  # only stops a wait from hanging forever


async def one(client: httpx.AsyncClient, index: int) -> tuple[httpx.Response, str]:
    body = {
        "model": "tiny",
        "prompt": f"overload {index}",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": index % 2 == 0,
    }
    async with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as response:
        return response, (await response.aread()).decode()


async def test_excess_requests_get_503_and_the_rest_complete(small_server):
    async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60, limits=httpx.Limits(max_connections=NUM_REQUESTS)) as client:
        results = await asyncio.gather(*[one(client, i) for i in range(NUM_REQUESTS)])
        accepted = [(r, raw) for r, raw in results if r.status_code == 200]
        refused = [r for r, _ in results if r.status_code != 200]
        print(f"\noverload: {len(accepted)} admitted, {len(refused)} refused of {NUM_REQUESTS}")

        # At most queue + running get in (exactly that many when nothing finished meanwhile).
        assert SMALL_QUEUE_LEN <= len(accepted) <= SMALL_QUEUE_LEN + SMALL_MAX_NUM_SEQS, [r.status_code for r, _ in results]
        for response in refused:
            assert_openai_error(response, 503, code="queue_full")
            assert int(response.headers["retry-after"]) >= 1
        for response, raw in accepted:  # admitted work neither fails nor is cut short
            if response.headers["content-type"].startswith("text/event-stream"):
                stream = parse_stream(200, raw)
                stream.assert_ended_properly()
                assert not stream.errors and stream.finish_reasons == ["length"]
            else:
                assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS

        assert await wait_engine_idle(client) == [0.0, 0.0, 0.0]
        assert (await client.get("/health")).status_code == 200
        after = await client.post("/v1/completions", json={"model": "tiny", "prompt": "after the storm", "max_tokens": 4}, headers=AUTH)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


async def test_refused_requests_never_reach_the_engine(small_server):
    """The queue check happens before anything is queued: a refused request leaves no trace."""
    async with httpx.AsyncClient(base_url=small_server.base_url, timeout=60) as client:
        await wait_engine_idle(client)
        before = metric((await client.get("/metrics")).text, "tokenstep_prompt_tokens_total")
        # One request asking for more sequences than the server can ever queue: 400, not 503.
        too_many = {"model": "tiny", "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 1}
        error = assert_openai_error(await client.post("/v1/completions", json=too_many, headers=AUTH), 400)
        assert "sequences" in error["message"]
        assert metric((await client.get("/metrics")).text, "tokenstep_prompt_tokens_total") == before


async def test_queue_counts_every_choice_of_a_request(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    """n and prompt lists count per sequence, and a request is admitted whole or not at all."""
    served = build_served(tiny_llama_dir, tiny_weights, max_queue_len=3, step_delay_s=0.01, max_num_seqs=1)
    async with in_process(served) as env:
        busy = asyncio.create_task(env.client.post("/v1/completions", json={"prompt": "busy", "max_tokens": 40, "ignore_eos": True}))
        deadline = asyncio.get_running_loop().time() + HANG_GUARD_S
        while not env.batcher.core.scheduler.running:
            assert asyncio.get_running_loop().time() < deadline, "the busy request never ran"
            await asyncio.sleep(0.005)
        prompt_tokens = env.batcher.core.num_prompt_tokens_total
        refused = await env.client.post("/v1/completions", json={"prompt": ["x", "y"], "n": 2, "max_tokens": 2})
        assert_openai_error(refused, 503, code="queue_full")
        assert env.batcher.core.num_prompt_tokens_total == prompt_tokens and env.batcher.num_waiting == 0
        fits = await env.client.post("/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 2})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 3
        assert (await busy).status_code == 200
        await env.wait_idle()
