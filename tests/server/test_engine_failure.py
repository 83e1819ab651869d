"""A step that raises fails only its requests: the client gets an OpenAI-style
error, the blocks go back and the server keeps serving."""

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import pytest_asyncio

from batching.messages import SchedulerOutput
from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.server.conftest import BASE_URL
from tests.server.sse import parse_completion_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

REQUEST = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}


class ExplodingRunner:
    def step(self, scheduler_output: SchedulerOutput):
        raise RuntimeError("kaboom in the forward")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def failing(make_served: Callable[[], Served]) -> AsyncIterator[tuple[httpx.AsyncClient, Served]]:
    served = make_served()
    served.batcher.core.runner = ExplodingRunner()
    app = create_app(Settings(api_key=None), ready=served)
    async with app.router.lifespan_context(app):
        # raise_app_exceptions=False: see what a real server would send, not the traceback.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
            yield client, served


async def test_streaming_failure_sends_an_error_event(failing):
    client, served = failing
    response = await client.post("/v1/completions", json={**REQUEST, "stream": True})
    assert response.status_code == 200
    events = parse_completion_stream(response.text)
    assert len(events) == 1
    error = events[0]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "kaboom" in error["message"]


async def test_failure_frees_blocks_and_server_keeps_serving(failing):
    client, served = failing
    await client.post("/v1/completions", json={**REQUEST, "stream": True})
    core = served.batcher.core
    assert core.scheduler.block_manager.num_used_blocks == 0
    assert not core.has_unfinished
    assert served.batcher.is_running
    assert (await client.get("/health")).status_code == 200


async def test_non_streaming_failure_is_an_openai_error(failing):
    client, _ = failing
    response = await client.post("/v1/completions", json=REQUEST)
    assert response.status_code == 500
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "kaboom" in body["error"]["message"]


async def test_a_messages_stream_that_fails_ends_with_anthropics_error_event(failing):
    """/v1/messages streams Anthropic's typed events: a failure after
    message_start is its ``error`` event (Anthropic's error shape), the
    stream's last, and the request's blocks go back."""
    client, served = failing
    body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}], "stream": True}
    response = await client.post("/v1/messages", json=body)
    assert response.status_code == 200
    events = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "error", events
    last_data = [line for line in response.text.splitlines() if line.startswith("data: ")][-1]
    error = json.loads(last_data.removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error" and "kaboom" in error["error"]["message"]
    assert served.batcher.core.scheduler.block_manager.num_used_blocks == 0
