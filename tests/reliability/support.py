"""Shared by the reliability tests: in-process apps over the real tiny engine
(optionally behind a fault-injecting runner), Prometheus scraping, and SSE
reading that tells a proper ending (``data: [DONE]``) from a cut stream.

The fault hook lives here, in the tests, not in the server: ``FaultyRunner``
wraps the model runner of an engine built in-process, so nothing reachable
over HTTP in production can make a step fail.
"""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from batching.batcher import DynamicBatcher
from batching.messages import RunnerOutput, SchedulerOutput
from model_runtime.loading.loader import LoadedModel
from server.app import create_app
from server.engine_builder import EngineConfig, build_engine_core
from server.settings import Settings
from server.state import Served
from tests.server.asgi_stream import StreamingASGITransport
from tests.server.sse import DONE, sse_data

BASE_URL = "http://tokenstep.test"
MODEL_NAME = "tiny"
ENGINE_STATE = ("tokenstep_num_requests_running", "tokenstep_num_requests_waiting", "tokenstep_kv_cache_usage_ratio")


class InjectedFault(RuntimeError):
    """What ``FaultyRunner`` raises inside a step."""


class FaultyRunner:
    """Wraps a model runner: optionally sleeps ``delay_s`` per step (to make
    timing deterministic on a fast tiny model), and raises ``InjectedFault``
    on the next step after ``arm()``. Runs in the engine's worker thread."""

    def __init__(self, inner: Any, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._num_armed = 0
        self.failed_request_ids: list[str] = []

    def arm(self, num_steps: int = 1) -> None:
        """Make the next ``num_steps`` steps raise."""
        with self._lock:
            self._num_armed += num_steps

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            should_fail = self._num_armed > 0
            self._num_armed -= should_fail
        if should_fail:
            self.failed_request_ids.extend(chunk.request_id for chunk in scheduler_output.chunks)
            raise InjectedFault("injected fault in the forward")
        return self.inner.step(scheduler_output)


def build_served(
    model_dir: Path, loaded: LoadedModel, max_queue_len: int | None = None, step_delay_s: float = 0.0, **engine: Any
) -> Served:
    """A fresh (not started) real engine on the tiny model behind a ``FaultyRunner``."""
    config = EngineConfig(model=model_dir, dtype="float32", device="cpu", kv_cache_memory="64MiB", **engine)
    core = build_engine_core(config, loaded=loaded)
    core.runner = FaultyRunner(core.runner, step_delay_s)
    return Served(DynamicBatcher(core, max_queue_len), core.tokenizer, MODEL_NAME, core.max_model_len)


@dataclass
class InProcess:
    """A running in-process app, a client that can hang up mid-stream, and its engine."""

    client: httpx.AsyncClient
    served: Served
    app: Any

    @property
    def batcher(self) -> DynamicBatcher:
        return self.served.batcher

    @property
    def runner(self) -> FaultyRunner:
        return self.served.batcher.core.runner

    def num_used_blocks(self) -> int:
        return self.served.batcher.core.scheduler.block_manager.num_used_blocks

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Until no request is open and every KV block is back in the pool."""
        deadline = time.monotonic() + timeout_s
        while self.batcher.num_requests or self.batcher.core.has_unfinished or self.num_used_blocks():
            assert time.monotonic() < deadline, f"engine not idle: {self.batcher.num_requests} open, {self.num_used_blocks()} blocks used"
            await asyncio.sleep(0.01)


@asynccontextmanager
async def in_process(served: Served, settings: Settings | None = None) -> AsyncIterator[InProcess]:
    """Run the app's lifespan around ``served``; yield a streaming-capable client."""
    app = create_app(settings or Settings(), ready=served)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url=BASE_URL, timeout=60) as client:
            yield InProcess(client, served, app)


# ------------------------------------------------------------------ metrics


def metric(text: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


async def wait_engine_idle(client: httpx.AsyncClient, timeout_s: float = 10.0) -> list[float]:
    """Poll ``/metrics`` until running, waiting and KV usage are all 0; return them."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = (await client.get("/metrics")).text
        state = [metric(text, name) for name in ENGINE_STATE]
        if state == [0.0, 0.0, 0.0] or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------- SSE


@dataclass
class StreamResult:
    """What one SSE response delivered."""

    status: int
    events: list[dict[str, Any]] = field(default_factory=list)
    is_done: bool = False  # ended with data: [DONE]
    body: str = ""

    @property
    def text(self) -> str:
        return "".join(
            choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            for event in self.events
            for choice in event.get("choices", [])
        )

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [event["error"] for event in self.events if "error" in event]

    @property
    def finish_reasons(self) -> list[str]:
        return [choice["finish_reason"] for event in self.events for choice in event.get("choices", []) if choice.get("finish_reason")]

    def assert_ended_properly(self) -> None:
        """Exactly one [DONE], last; every other event a JSON object."""
        assert self.is_done, f"stream cut without [DONE]: {self.body[-300:]!r}"
        assert not self.errors or len(self.errors) == 1 and "error" in self.events[-1], self.events[-3:]


def parse_stream(status: int, body: str) -> StreamResult:
    payloads = sse_data(body)
    is_done = bool(payloads) and payloads[-1] == DONE and DONE not in payloads[:-1]
    events = [json.loads(payload) for payload in payloads if payload != DONE]
    return StreamResult(status, events, is_done, body)


async def read_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> StreamResult:
    """POST a streaming request and read it to its end."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        raw = (await response.aread()).decode()
    if response.status_code != 200:
        return StreamResult(response.status_code, [json.loads(raw)], False, raw)
    return parse_stream(response.status_code, raw)


def assert_openai_error(response: httpx.Response, status: int, code: Any = ...) -> dict[str, Any]:
    """An OpenAI-shaped JSON error with this status (and code, when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    if code is not ...:
        assert error["code"] == code, error
    return error
