"""``DynamicBatcher``: the asyncio face of the engine.

Route handlers call ``generate()``, which validates the request, puts it on
the intake queue and returns an async iterator of ``RequestOutput`` deltas.
One background task runs the loop: hand new requests and aborts to the core
-> ``core.step()`` on the single model thread (the event loop keeps serving
while it runs; the result comes back through the executor future, i.e.
``loop.call_soon_threadsafe``) -> push each delta onto its request's stream.
The step itself is ``EngineCore.step``, the same function tests call; the
loop only moves it onto the thread and publishes what it returned. The
core is touched from the event loop only between steps. A consumer that
stops iterating aborts its request, and the abort is applied before the
next step.

Reliability: ``check_admission`` refuses work past ``max_queue_len`` (503)
before anything is queued; ``drain`` stops admissions for a graceful
shutdown, waits for in-flight requests and ends the rest with an error; and
if the loop stops or dies, every open stream receives an error output at
once, so no client ever waits on a dead engine. Each of those ends goes
through ``EngineCore.fail``, the one error finish the scheduler records.
"""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from batching.engine_core import EngineCore
from batching.errors import EngineUnavailableError, InvalidRequestError, QueueFullError, ShuttingDownError
from batching.outputs import RequestOutput
from batching.pooling_params import PoolingModel, PoolingParams
from batching.request import EncoderDecoderPrompts, Request, RequestStatus
from batching.sampling_params import SamplingParams
from batching.stats import EngineStats, EngineView
from batching.views import engine_stats, engine_view

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # how often drain() looks whether the in-flight requests are done
IDLE_STEP_WAIT_S = 0.001  # after a step that scheduled nothing (nothing fits yet): let aborts arrive


class DynamicBatcher:
    """Continuous batching over an ``EngineCore``; one instance per server.

    ``max_queue_len`` (None: unbounded) caps the requests not yet running
    (waiting + not yet handed to the scheduler) beyond the free running slots.
    """

    def __init__(self, core: EngineCore, max_queue_len: int | None = None) -> None:
        self.core = core
        self.max_queue_len = max_queue_len
        self._intake: asyncio.Queue[Request] = asyncio.Queue()
        self._aborts: set[str] = set()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None  # the one model thread, while started
        self._owns_executor = True
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._is_draining = False
        self._step_in_flight: asyncio.Future | None = None  # core.step() running on the model thread
        self._pending_failure: tuple[str, int] | None = None  # (message, status) to end every request with
        self.failure: str | None = None  # why the loop died, if it did

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def is_draining(self) -> bool:
        """True once ``drain()`` began: nothing new is admitted."""
        return self._is_draining

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def num_pending(self) -> int:
        """Requests accepted by ``generate`` but not yet handed to the scheduler."""
        return self._intake.qsize()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: waiting in the scheduler or still pending."""
        return len(self.core.scheduler.waiting) + self.num_pending

    @property
    def kv_capacity_tokens(self) -> int:
        block_manager = self.core.scheduler.block_manager
        return block_manager.num_blocks * block_manager.block_size

    @property
    def vocab_size(self) -> int | None:
        return self.core.vocab_size

    @property
    def encoder_decoder(self) -> EncoderDecoderPrompts | None:
        """Set for an encoder-decoder model: prompts are its sources."""
        return self.core.encoder_decoder

    @property
    def pooling(self) -> PoolingModel | None:
        """Set for a pooling model (an embedder): requests pool, nothing generates."""
        return self.core.pooling

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    def stats(self) -> EngineStats:
        """A snapshot of the engine's gauges and counters (see ``batching.views``)."""
        return engine_stats(self.core, self.num_pending)

    def view(self) -> EngineView:
        """``stats()`` plus every request's row, the block map and the recent steps."""
        return engine_view(self.core, self.num_pending)

    async def start(self, model_thread: ThreadPoolExecutor | None = None) -> None:
        """Start the loop. Pass ``model_thread`` (one worker) to step the model
        on the thread that loaded it: torch's OpenMP pool is per calling
        thread, and a second thread running torch ops slows every step
        (docs/PERFORMANCE.md, "Measurements behind choices in the code")."""
        if self._task is None:
            # Without a given thread, a fresh one per start: a stopped batcher can be started again.
            self._owns_executor = model_thread is None
            self._executor = model_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenstep-step")
            self._is_draining, self.failure = False, None
            self._task = asyncio.create_task(self._loop(), name="tokenstep-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            if self._owns_executor:
                self._executor.shutdown(wait=True)
            self._executor = None

    def check_available(self) -> None:
        """Raise a 503 error unless the engine runs and is not draining."""
        if self._is_draining:
            raise ShuttingDownError("the server is shutting down; retry on another replica or later")
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")

    def check_admission(self, num_requests: int = 1) -> None:
        """Raise unless ``num_requests`` more requests may be queued right now.

        503 (``ShuttingDownError``, ``EngineUnavailableError``, ``QueueFullError``)
        when draining, stopped, or when the requests not yet running, minus the
        free running slots they will take at the next step, would exceed
        ``max_queue_len``; 400 when one HTTP request asks for more sequences
        than could ever be queued at once.
        """
        self.check_available()
        if self.max_queue_len is None:
            return
        max_num_seqs = self.core.scheduler.config.max_num_seqs
        if num_requests > self.max_queue_len + max_num_seqs:
            raise InvalidRequestError(
                f"this request asks for {num_requests} sequences (prompts x n), more than the server "
                f"can ever queue at once ({self.max_queue_len + max_num_seqs})",
                param="n",
            )
        num_free_seqs = max(max_num_seqs - len(self.core.scheduler.running), 0)
        if self.num_waiting + num_requests - num_free_seqs > self.max_queue_len:
            raise QueueFullError(
                f"the server is overloaded: {self.num_waiting} requests are waiting and the queue holds {self.max_queue_len}; retry later"
            )

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting, let in-flight requests finish for up to ``timeout_s``
        seconds, then end the rest with a 503 error output. Returns how many
        were ended that way."""
        self._is_draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._streams and self.is_running and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        num_unfinished = len(self._streams)
        if num_unfinished:
            logger.warning("shutdown: ending %d unfinished requests after %.1f s", num_unfinished, timeout_s)
        if self.is_running:  # the loop ends them between two steps
            self._pending_failure = ("the server is shutting down", 503)
            self._wakeup.set()
            while self._streams and self.is_running:
                await asyncio.sleep(DRAIN_POLL_S)
        if self._streams:
            self._fail_all("the server is shutting down", status=503)
        return num_unfinished

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams, request_id: str | None = None
    ) -> "RequestStream":
        """Admit a request and return its stream of deltas (with
        ``PoolingParams``, one delta carrying the pooled vector).

        Validation errors (``InvalidRequestError``) are raised here, before
        the first delta, so the server can answer 400 instead of streaming.
        A grammar (structured output) compiles in a worker thread: a big
        schema must not stall every other stream.
        """
        self.check_admission(1)
        request_id = request_id or f"req-{next(self._ids)}"
        if not isinstance(params, SamplingParams) or params.guided is None:
            request = self.core.make_request(request_id, prompt_token_ids, params)
        else:
            request = await asyncio.to_thread(self.core.make_request, request_id, prompt_token_ids, params)
        self.core.scheduler.check_fits(request)
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._intake.put_nowait(request)
        self._wakeup.set()
        return RequestStream(self, request_id, self._iterate(request_id, stream))

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
        """Run iterations until cancelled. If one raises outside the model
        step (a bug in scheduling or text processing), the loop is dead:
        every open stream gets an error output and ``is_running`` turns
        False, so the server answers 503 from then on instead of leaving
        clients hanging."""
        try:
            while True:
                await self._iteration()
        except asyncio.CancelledError:
            await self._settle_step_in_flight()
            self._fail_all("the engine stopped", status=503)
            raise
        except Exception as exc:
            logger.exception("the engine loop died")
            self.failure = f"{type(exc).__name__}: {exc}"
            self._fail_all(f"the engine stopped unexpectedly: {self.failure}", status=500)

    async def _iteration(self) -> None:
        """One iteration: hand over new requests and aborts, then
        ``core.step()`` on the model thread, then publish its deltas."""
        self._admit_and_abort()
        if self._pending_failure is not None:
            self._fail_all(*self._pending_failure)
            self._pending_failure = None
        if not self.core.has_unfinished:
            self._wakeup.clear()
            await self._wakeup.wait()
            return
        num_idle_steps = self.core.num_idle_steps
        self._step_in_flight = asyncio.get_running_loop().run_in_executor(self._executor, self.core.step)
        outputs = await self._step_in_flight
        self._step_in_flight = None
        self._publish(outputs)
        if self.core.num_idle_steps != num_idle_steps:
            await asyncio.sleep(IDLE_STEP_WAIT_S)

    async def _settle_step_in_flight(self) -> None:
        """Cancelled mid-step: the model thread still finishes that step; wait
        for it (so nothing else touches the core meanwhile) and publish it."""
        step, self._step_in_flight = self._step_in_flight, None
        if step is None:
            return
        await asyncio.wait([step])
        if not step.cancelled() and step.exception() is None:
            self._publish(step.result())

    def _fail_all(self, message: str, status: int) -> None:
        """End every open stream with an error now, through the core's one
        error finish (the scheduler records it and frees the blocks). Runs
        only while no step is in flight. Streams the core cannot end (it
        died mid-step) get the error directly."""
        try:
            self._admit_and_abort()
            self._publish(self.core.fail(list(self._streams), message, status))
        except Exception:
            logger.exception("could not end the requests through the engine")
        for request_id, stream in self._streams.items():
            stream.put_nowait(
                RequestOutput(
                    request_id, [], "", finish_reason=RequestStatus.FINISHED_ERROR.finish_reason, error=message, error_status=status
                )
            )
        self._streams.clear()
        self._wakeup.set()

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


class RequestStream:
    """One request's deltas, for ``async for``. Closing it (``aclose``)
    before the last delta aborts the request, also when it was never
    iterated (an async generator that never started runs no ``finally``);
    leaving it mid-iteration aborts it too (``DynamicBatcher._iterate``)."""

    def __init__(self, batcher: DynamicBatcher, request_id: str, outputs: AsyncIterator[RequestOutput]) -> None:
        self.request_id = request_id
        self._batcher = batcher
        self._outputs = outputs

    def __aiter__(self) -> "RequestStream":
        return self

    def __anext__(self):
        return self._outputs.__anext__()

    async def aclose(self) -> None:
        await self._outputs.aclose()
        self._batcher.abort(self.request_id)  # nothing to do once it finished
