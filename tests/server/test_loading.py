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
HANG_GUARD_S = 30  # only stops a wait from hanging forever


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
    release, entered = threading.Event(), threading.Event()
    calls = []

    def load() -> Served:
        calls.append(threading.current_thread().name)
        entered.set()
        assert release.wait(timeout=HANG_GUARD_S), "the test never released the loader"
        return served

    app = create_app(Settings(api_key=None), load=load)
    try:
        async with running(app) as client:
            assert_unavailable(await client.get("/health"))
            assert_unavailable(await client.post("/v1/completions", json=REQUEST))
            # Still loading while the loader runs: it blocks start-up of the engine only.
            assert await asyncio.to_thread(entered.wait, HANG_GUARD_S), "the loader never started"
            assert_unavailable(await client.get("/health"))
            assert calls[0] != threading.main_thread().name, "the loader must run off the event loop"

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
    """The lifespan ends while the loader is still blocked: it does not wait for it."""
    release, entered, returned = threading.Event(), threading.Event(), threading.Event()

    def load() -> Served:
        entered.set()
        release.wait(timeout=HANG_GUARD_S)
        returned.set()
        return make_served()

    app = create_app(Settings(api_key=None), load=load)
    try:
        async with running(app) as client:
            assert_unavailable(await client.get("/health"))
            assert await asyncio.to_thread(entered.wait, HANG_GUARD_S), "the loader never started"
        assert not returned.is_set(), "leaving the lifespan waited for the loader to return"
    finally:
        release.set()
    assert await asyncio.to_thread(returned.wait, HANG_GUARD_S)
