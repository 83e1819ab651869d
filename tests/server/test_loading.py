"""``/health`` and the routes while the model loads in the background, and
after loading failed."""

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.server.conftest import running

pytestmark = pytest.mark.asyncio(loop_scope="session")

REQUEST = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def assert_unavailable(response: httpx.Response) -> dict:
    assert response.status_code == 503, response.text
    assert "retry-after" in response.headers
    assert int(response.headers["retry-after"]) > 0
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


async def wait_for_health(client: httpx.AsyncClient, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get("/health")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.02)


async def test_health_is_503_while_loading_then_200(make_served: Callable[[], Served]):
    served = make_served()
    release = threading.Event()
    calls = []

    def load() -> Served:
        calls.append(threading.current_thread().name)
        assert release.wait(timeout=30), "the test never released the loader"
        return served

    app = create_app(Settings(api_key=None), load=load)
    try:
        async with running(app) as client:
            assert_unavailable(await client.get("/health"))
            assert_unavailable(await client.post("/v1/completions", json=REQUEST))
            # Still loading a moment later: the loader really blocks start-up of the engine only.
            await asyncio.sleep(0.05)
            assert_unavailable(await client.get("/health"))
            assert calls and calls[0] != threading.main_thread().name, "the loader must run off the event loop"

            release.set()
            response = await wait_for_health(client)
            assert response.status_code == 200
            completion = await client.post("/v1/completions", json=REQUEST)
            assert completion.status_code == 200, completion.text
            assert completion.json()["model"] == served.model_name
        assert not served.batcher.is_running, "leaving the lifespan stops the engine"
    finally:
        release.set()


async def test_health_reports_a_failed_load():
    def load() -> Served:
        raise RuntimeError("weights are corrupt")

    app = create_app(Settings(api_key=None), load=load)
    async with running(app) as client:
        deadline = time.monotonic() + 5
        while app.state.load_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        error = assert_unavailable(await client.get("/health"))
        assert "weights are corrupt" in error["message"]
        assert_unavailable(await client.post("/v1/completions", json=REQUEST))


async def test_leaving_the_lifespan_while_loading_does_not_hang(make_served: Callable[[], Served]):
    release = threading.Event()

    def load() -> Served:
        release.wait(timeout=30)
        return make_served()

    app = create_app(Settings(api_key=None), load=load)
    try:
        started = time.monotonic()
        async with running(app) as client:
            assert_unavailable(await client.get("/health"))
        assert time.monotonic() - started < 5
    finally:
        release.set()
