"""A client gone at any moment aborts its request, and its blocks return
within one engine step: while still pending (before the scheduler saw it),
while waiting for a running slot, mid-prefill and mid-decode.
(tests/server/test_completions.py and tests/e2e/test_api_misc.py cover the
plain mid-stream and non-streaming cases.)"""

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from model_runtime.loading.loader import LoadedModel
from tests.reliability.support import InProcess, build_served, in_process, read_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

STEP_DELAY_S = 0.05  # long steps: a disconnect always lands while one is in flight
CHUNK_TOKENS = 32
HANG_GUARD_S = 30  # only stops a wait from hanging; the checks count steps


@pytest.fixture
async def env(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    served = build_served(tiny_llama_dir, tiny_weights, step_delay_s=STEP_DELAY_S, max_num_seqs=1, max_num_batched_tokens=CHUNK_TOKENS)
    async with in_process(served) as env:
        yield env


def request(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}


async def wait_until(condition: Callable[[], object], failure: str) -> None:
    """Poll ``condition()``; fail with ``failure`` if it does not hold within ``HANG_GUARD_S``."""
    deadline = asyncio.get_running_loop().time() + HANG_GUARD_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, failure
        await asyncio.sleep(0.001)


async def hang_up_when(env: InProcess, body: dict, condition: Callable[[], object]) -> int:
    """Open a stream, hang up once ``condition()`` holds; return the step count then."""
    async with env.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        await wait_until(condition, "the request never reached the state under test")
        return env.batcher.num_steps


def request_state(env: InProcess, request_id_prefix: str = "cmpl-") -> list:
    return [r for r in env.batcher.core.scheduler.requests.values() if r.request_id.startswith(request_id_prefix)]


async def assert_freed_within_one_step(env: InProcess, steps_at_hang_up: int, blocks_before: int) -> None:
    def is_freed() -> bool:
        assert env.batcher.num_steps - steps_at_hang_up <= 1, "blocks not back within one step"
        return env.num_used_blocks() <= blocks_before and env.batcher.num_requests <= (1 if blocks_before else 0)

    await wait_until(is_freed, "the abandoned request's blocks never came back (and the engine stopped stepping)")


async def test_hang_up_mid_prefill(env):
    prompt = " ".join(["word"] * 300)  # ~300 tokens: about ten 32-token chunks
    num_prompt = len(env.served.tokenizer(prompt).input_ids)

    def mid_prefill() -> bool:
        return any(0 < r.num_computed_tokens < num_prompt - CHUNK_TOKENS for r in request_state(env))

    steps = await hang_up_when(env, request(prompt, 8), mid_prefill)
    await assert_freed_within_one_step(env, steps, 0)
    assert env.batcher.core.num_generation_tokens_total == 0


async def test_hang_up_mid_decode(env):
    steps = await hang_up_when(env, request("decode then leave", 200), lambda: any(r.num_output_tokens >= 3 for r in request_state(env)))
    await assert_freed_within_one_step(env, steps, 0)


async def test_hang_up_while_waiting_for_a_slot(env):
    runner_up = asyncio.create_task(read_stream(env.client, "/v1/completions", request("occupies the only slot", 12)))
    await wait_until(lambda: any(r.num_output_tokens >= 1 for r in request_state(env)), "the first request never began decoding")
    blocks_of_runner_up = env.num_used_blocks()
    assert blocks_of_runner_up > 0
    steps = await hang_up_when(env, request("waits, then leaves", 8), lambda: env.batcher.core.scheduler.waiting)
    await assert_freed_within_one_step(env, steps, blocks_of_runner_up)
    assert not env.batcher.core.scheduler.waiting
    result = await runner_up  # the running request is untouched
    assert result.finish_reasons == ["length"] and not result.errors
    await env.wait_idle()


async def test_hang_up_before_the_scheduler_saw_it(env):
    runner_up = asyncio.create_task(read_stream(env.client, "/v1/completions", request("keeps the engine stepping", 8)))
    await wait_until(lambda: any(r.num_output_tokens >= 1 for r in request_state(env)), "the first request never began decoding")
    prompt_tokens_before = env.batcher.core.num_prompt_tokens_total
    # Pending: accepted by generate() while a step runs, not yet handed to the scheduler.
    await hang_up_when(env, request("pending, then gone", 8), lambda: env.batcher.num_pending == 1)
    await runner_up
    await env.wait_idle()
    assert env.batcher.core.num_prompt_tokens_total == prompt_tokens_before, "the abandoned request reached the scheduler"
