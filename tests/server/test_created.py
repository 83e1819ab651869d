"""``created`` is the request's arrival time, not its finish time, in the
JSON body of ``/v1/completions`` and ``/v1/chat/completions``.

The real tiny engine runs behind a runner that holds its first step until the
test lets it go, once the wall clock has entered a later second than the
request's arrival: arrival and finish then fall in different seconds
however fast or slow the host is.
"""

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from batching.messages import RunnerOutput, SchedulerOutput
from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.server.conftest import running

pytestmark = pytest.mark.asyncio(loop_scope="session")

HANG_GUARD_S = 30  # only stops a wait from hanging forever


class HeldRunner:
    """Wraps a model runner: each step waits for ``release`` (set once, it
    lets every later step through); ``is_holding`` tells a step is waiting."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.is_holding = threading.Event()
        self.release = threading.Event()

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.is_holding.set()
        assert self.release.wait(HANG_GUARD_S), "the test never released the step"
        return self.inner.step(scheduler_output)


BODIES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


@pytest.mark.parametrize("path", list(BODIES))
async def test_created_is_the_arrival_time(make_served: Callable[[], Served], path: str):
    served = make_served()
    runner = HeldRunner(served.batcher.core.runner)
    served.batcher.core.runner = runner
    async with running(create_app(Settings(api_key=None), ready=served)) as client:
        before_s = time.time()
        pending = asyncio.create_task(client.post(path, json=BODIES[path]))
        try:
            assert await asyncio.to_thread(runner.is_holding.wait, HANG_GUARD_S), "the request never reached a step"
            in_engine_s = time.time()  # the route has taken its arrival time by now
            while int(time.time()) <= int(in_engine_s):  # let the next second begin while the request is held
                await asyncio.sleep(0.01)
        finally:
            runner.release.set()
        response = await pending
    assert response.status_code == 200, response.text
    assert int(before_s) <= response.json()["created"] <= int(in_engine_s) < int(time.time())
