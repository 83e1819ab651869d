"""Shutdown: SIGTERM stops admissions (503 + ``Retry-After``, ``/health`` 503),
lets in-flight requests finish for up to ``--shutdown-timeout``, then ends the
rest with an error event and ``[DONE]`` (or a 503 JSON), and exits 0."""

import asyncio
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from model_runtime.loading.loader import LoadedModel
from server.shutdown import drain
from tests.reliability.conftest import start_server
from tests.reliability.support import assert_openai_error, build_served, in_process, parse_stream, read_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Margins that hold on fast and slow hosts alike (the suite runs on hosts that
# differ 3x in speed): the short requests need a small fraction of the timeout
# even at 100 ms a token, and the long ones, in a context stretched far past the
# tiny model's 1024 positions, cannot finish within it even at 0.1 ms a token.
SHUTDOWN_TIMEOUT_S = 4.0
SHORT_TOKENS = 16
LONG_TOKENS = 60_000
LONG_CONTEXT = 65_536

# The in-process drain: every step sleeps STEP_DELAY_S, so the long requests take
# at least LONG_TOKENS_IN_PROCESS * STEP_DELAY_S = 10 s, five times the timeout.
STEP_DELAY_S = 0.02
DRAIN_TIMEOUT_S = 2.0
LONG_TOKENS_IN_PROCESS = 500


HANG_GUARD_S = 30  # only stops a wait from hanging; no assertion here is about time


async def wait_until(condition: Callable[[], bool], failure: str) -> None:
    deadline = asyncio.get_running_loop().time() + HANG_GUARD_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, failure
        await asyncio.sleep(0.005)


def completion(prompt: str, max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


async def test_drain_finishes_short_requests_and_ends_the_rest(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    served = build_served(tiny_llama_dir, tiny_weights, step_delay_s=STEP_DELAY_S)
    async with in_process(served) as env:
        # Warm first: a cold process's first steps alone can outlast the drain timeout.
        assert (await env.client.post("/v1/completions", json=completion("warm up", 2, stream=False))).status_code == 200
        short = asyncio.create_task(read_stream(env.client, "/v1/completions", completion("short", SHORT_TOKENS)))
        long = asyncio.create_task(read_stream(env.client, "/v1/completions", completion("long", LONG_TOKENS_IN_PROCESS)))
        long_json = asyncio.create_task(
            env.client.post("/v1/completions", json=completion("long json", LONG_TOKENS_IN_PROCESS, stream=False))
        )
        await wait_until(lambda: len(env.batcher.core.scheduler.running) == 3, "the three requests never all ran")
        draining = asyncio.create_task(drain(env.app, timeout_s=DRAIN_TIMEOUT_S))
        await wait_until(lambda: env.batcher.is_draining, "the drain never began")

        refused = await env.client.post("/v1/completions", json=completion("too late", 2, stream=False))
        assert_openai_error(refused, 503, code="shutting_down")
        assert refused.headers["retry-after"]
        assert "shutting down" in (await env.client.get("/health")).json()["error"]["message"]

        await draining
        finished, cut = await short, await long
        finished.assert_ended_properly()
        assert finished.finish_reasons == ["length"] and not finished.errors
        cut.assert_ended_properly()
        [error] = cut.errors
        assert error["code"] == 503 and "shutting down" in error["message"]
        assert_openai_error(await long_json, 503)
        await env.wait_idle(timeout_s=HANG_GUARD_S)


async def read_events(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> tuple[int, str]:
    async with client.stream("POST", "/v1/completions", json=body) as response:
        raw = ""
        async for chunk in response.aiter_text():
            raw += chunk
            if "data:" in raw:
                started.set()
        return response.status_code, raw


def long_context_copy(model_dir: Path, target: Path) -> Path:
    """``model_dir`` with ``LONG_CONTEXT`` positions (RoPE has no table to outgrow)."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (target / "config.json").write_text(json.dumps(config))
    return target


async def test_sigterm_drains_streams_and_exits_0(tiny_llama_dir: Path, tmp_path: Path):
    log = tmp_path / "server.log"
    model_dir = long_context_copy(tiny_llama_dir, tmp_path / "long-context")
    args = [
        str(model_dir),
        "--served-model-name",
        "tiny",
        "--dtype",
        "float32",
        "--kv-cache-memory",
        "160MiB",
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
    ]
    server = start_server(args, log)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            bodies = [completion(f"short {i}", SHORT_TOKENS) for i in range(2)] + [completion(f"long {i}", LONG_TOKENS) for i in range(2)]
            started = [asyncio.Event() for _ in bodies]
            streams = [asyncio.create_task(read_events(client, body, event)) for body, event in zip(bodies, started)]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), timeout=30)

            server.process.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as newcomer:  # a new connection, mid-drain
                deadline = asyncio.get_running_loop().time() + HANG_GUARD_S
                while (await newcomer.get("/health")).status_code != 503:  # the signal is handled asynchronously
                    assert asyncio.get_running_loop().time() < deadline, "/health never turned 503 after SIGTERM"
                    await asyncio.sleep(0.02)
                assert_openai_error(
                    await newcomer.post("/v1/completions", json=completion("late", 2, stream=False)), 503, code="shutting_down"
                )

            results = [parse_stream(status, raw) for status, raw in await asyncio.wait_for(asyncio.gather(*streams), timeout=30)]
        exit_code = await asyncio.to_thread(server.process.wait, HANG_GUARD_S + SHUTDOWN_TIMEOUT_S)
    except BaseException:
        server.close()
        raise
    assert exit_code == 0
    for result in results:
        result.assert_ended_properly()
    for short in results[:2]:  # finished within the timeout, in full
        assert not short.errors and short.finish_reasons == ["length"]
        assert short.events[-1]["usage"]["completion_tokens"] == SHORT_TOKENS
    for long in results[2:]:  # ended at the timeout: tokens so far, an error event, [DONE]
        assert long.text
        [error] = long.errors
        assert error["code"] == 503 and "shutting down" in error["message"]
    assert "ending 2 unfinished requests" in log.read_text()
