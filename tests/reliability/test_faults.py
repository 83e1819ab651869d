"""Faults: a step that raises fails only the requests in that step (a final
SSE error event then ``[DONE]``, or a 500 JSON) and the engine keeps serving;
if the engine loop itself dies, every open request ends with an error at once,
``/health`` turns 503 and new requests get 503, never a hang."""

import asyncio
from pathlib import Path

import pytest

from model_runtime.loading.loader import LoadedModel
from tests.reliability.support import assert_openai_error, build_served, in_process, read_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

STEP_DELAY_S = 0.005  # makes a request of N tokens take >= N * 5 ms, so timing is predictable


def body(index: int, max_tokens: int = 40, stream: bool = False) -> dict:
    return {"prompt": f"fault test {index}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


async def test_a_failing_step_fails_only_its_requests(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    served = build_served(tiny_llama_dir, tiny_weights, step_delay_s=STEP_DELAY_S, max_num_seqs=2)
    async with in_process(served) as env:
        # Two run (one streaming, one not); two more wait for a free slot.
        running = [
            asyncio.create_task(read_stream(env.client, "/v1/completions", body(0, stream=True))),
            asyncio.create_task(env.client.post("/v1/completions", json=body(1))),
        ]
        await until(lambda: len(env.batcher.core.scheduler.running) == 2 and env.batcher.num_steps >= 2)
        waiting = [
            asyncio.create_task(read_stream(env.client, "/v1/completions", body(2, stream=True))),
            asyncio.create_task(env.client.post("/v1/completions", json=body(3))),
        ]
        await until(lambda: env.batcher.num_waiting == 2)
        env.runner.arm()
        streamed, non_streamed = await asyncio.gather(*running)
        later_stream, later_json = await asyncio.gather(*waiting)

        assert len(env.runner.failed_request_ids) == 2  # the step held exactly the two running requests
        streamed.assert_ended_properly()
        [error] = streamed.errors
        assert error["code"] == 500 and error["type"] == "server_error" and "injected fault" in error["message"]
        assert "injected fault" in assert_openai_error(non_streamed, 500)["message"]

        # The waiting requests were not in the failed step: they complete in full.
        later_stream.assert_ended_properly()
        assert not later_stream.errors and later_stream.finish_reasons == ["length"]
        assert later_json.status_code == 200 and later_json.json()["usage"]["completion_tokens"] == 40

        await env.wait_idle()
        assert (await env.client.get("/health")).status_code == 200
        again = await env.client.post("/v1/completions", json=body(4, max_tokens=3))
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3


async def test_a_dead_engine_loop_ends_every_request_and_answers_503(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    served = build_served(tiny_llama_dir, tiny_weights, step_delay_s=STEP_DELAY_S, max_num_seqs=2)
    core = served.batcher.core
    async with in_process(served) as env:
        streams = [asyncio.create_task(read_stream(env.client, "/v1/completions", body(i, max_tokens=400, stream=True))) for i in range(3)]
        plain = asyncio.create_task(env.client.post("/v1/completions", json=body(9, max_tokens=400)))
        await until(lambda: env.batcher.num_steps >= 3 and env.batcher.num_requests == 4)

        def broken_process(*args, **kwargs):
            raise RuntimeError("bug outside the model step")

        core.process = broken_process  # the next iteration raises outside runner.step
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=5)
        for result in results:
            result.assert_ended_properly()
            [error] = result.errors
            assert error["code"] == 500 and "engine stopped unexpectedly" in error["message"]
        assert_openai_error(await asyncio.wait_for(plain, timeout=5), 500)

        assert not env.batcher.is_running
        health = await env.client.get("/health")
        assert_openai_error(health, 503)
        assert "engine stopped" in health.json()["error"]["message"] and health.headers["retry-after"]
        for path, payload in (
            ("/v1/completions", body(10, max_tokens=2)),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ):
            refused = await asyncio.wait_for(env.client.post(path, json=payload), timeout=5)
            assert_openai_error(refused, 503)
            assert refused.headers["retry-after"]
        assert core.scheduler.block_manager.num_used_blocks == 0  # what could be freed was freed
