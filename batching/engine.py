"""``DynamicBatcher``: the asyncio face of the engine.

Route handlers call ``generate()``, which validates the request, puts it on
the intake queue and returns an async iterator of ``RequestOutput`` deltas.
One background task runs the loop: drain intake and aborts -> ``schedule()``
-> ``runner.step`` in the single worker thread (the event loop keeps serving
while the forward runs; the result comes back through the executor future,
i.e. ``loop.call_soon_threadsafe``) -> ``process()`` -> push each delta onto
its request's stream. A consumer that stops iterating aborts its request,
and the abort is applied before the next step.
"""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from batching.engine_core import EngineCore
from batching.errors import EngineUnavailableError
from batching.outputs import RequestOutput
from batching.request import Request
from batching.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class DynamicBatcher:
    """Continuous batching over an ``EngineCore``; one instance per server."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._intake: asyncio.Queue[Request] = asyncio.Queue()
        self._aborts: set[str] = set()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenstep-step")
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.num_steps = 0

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def num_pending(self) -> int:
        """Requests accepted by ``generate`` but not yet handed to the scheduler."""
        return self._intake.qsize()

    @property
    def kv_capacity_tokens(self) -> int:
        block_manager = self.core.scheduler.block_manager
        return block_manager.num_blocks * block_manager.block_size

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="tokenstep-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Admit a request and return its stream of deltas.

        Validation errors (``InvalidRequestError``) are raised here, before
        the first delta, so the server can answer 400 instead of streaming.
        """
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")
        request_id = request_id or f"req-{next(self._ids)}"
        request = self.core.make_request(request_id, prompt_token_ids, params)
        self.core.scheduler.check_fits(request)
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._intake.put_nowait(request)
        self._wakeup.set()
        return self._iterate(request_id, stream)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step."""
        if request_id in self._streams:
            self._aborts.add(request_id)
            self._wakeup.set()

    async def _iterate(self, request_id: str, stream: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.is_finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit_and_abort()
            if not self.core.has_unfinished:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            scheduler_output = self.core.schedule()
            if scheduler_output.is_empty:
                await asyncio.sleep(0.001)  # nothing fits yet; let aborts arrive
                continue
            try:
                runner_output = await loop.run_in_executor(self._executor, self.core.runner.step, scheduler_output)
            except Exception as exc:  # one bad step fails its requests, not the server
                logger.exception("engine step failed")
                ids = [chunk.request_id for chunk in scheduler_output.chunks]
                self._publish(self.core.fail(ids, f"engine step failed: {exc}"))
                continue
            self.num_steps += 1
            self._publish(self.core.process(scheduler_output, runner_output))

    def _admit_and_abort(self) -> None:
        while not self._intake.empty():
            request = self._intake.get_nowait()
            if request.request_id in self._aborts:
                self._aborts.discard(request.request_id)
                self._streams.pop(request.request_id, None)
                continue
            self.core.add_request(request)
        for request_id in list(self._aborts):
            output = self.core.abort(request_id)
            self._streams.pop(request_id, None)
            if output is not None:
                logger.debug("aborted %s", request_id)
        self._aborts.clear()

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.put_nowait(output)
            if output.is_finished:
                del self._streams[output.request_id]
