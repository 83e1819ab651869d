"""Fan-out and merge: prompts -> admitted engine requests (one per prompt x
``n``), and the merged stream of their deltas tagged with the OpenAI choice
``index``; the disconnect watch of non-streaming responses.

Every prompt is validated, and the queue checked (503 when full), before any
is queued. Consumers that stop early (client gone, error, ``--request-timeout``)
cancel the merge, which aborts every unfinished request. Errors after
admission are raised from the merge as ``TokenstepError``: the error handler
turns them into JSON for a non-streaming response, and ``server.sse`` into a
final error event for a stream.
"""

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from batching.outputs import RequestOutput
from batching.pooling_params import PoolingParams
from batching.sampling_params import SamplingParams
from server.errors import ClientDisconnected, RequestTimeoutError, output_error
from server.metrics import Metrics, RequestTimer
from server.state import Served

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    stream: AsyncIterator[RequestOutput]


async def start_choices(
    state: Served, prompts: list[list[int]], params: SamplingParams | PoolingParams | list[PoolingParams], n: int, request_id: str
) -> list[Choice]:
    """Admit ``len(prompts) * n`` requests; choice ``index = prompt * n + i``.
    ``params`` serve every prompt, or (a list) one prompt each.

    With a seed and ``n > 1``, choice i uses ``seed + i`` so the n samples
    differ yet the whole response stays reproducible.
    """
    state.batcher.check_admission(len(prompts) * n)
    choices: list[Choice] = []
    try:
        for prompt_index, prompt in enumerate(prompts):
            for sample_index in range(n):
                choice_params = params[prompt_index] if isinstance(params, list) else params
                if sample_index and params.seed is not None:  # n > 1: sampling params
                    choice_params = dataclasses.replace(params, seed=params.seed + sample_index)
                index = prompt_index * n + sample_index
                choice_id = f"{request_id}-{index}"
                stream = await state.batcher.generate(prompt, choice_params, choice_id)
                choices.append(Choice(index, choice_id, prompt, stream))
    except BaseException:
        for choice in choices:
            state.batcher.abort(choice.request_id)
        raise
    return choices


async def merge(
    state: Served, choices: list[Choice], metrics: Metrics, timeout_s: float | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the choices' deltas as they arrive, tagged with their index,
    observing each choice's latency metrics on the way.

    An error delta raises ``EngineFailedError``; running past ``timeout_s``
    seconds (None or 0: no limit) raises ``RequestTimeoutError``. However the
    consumer stops, every unfinished choice is aborted (a no-op for finished
    ones), so no request outlives its HTTP response and its blocks go back.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None

    async def pump(choice: Choice) -> None:
        timer = RequestTimer(metrics)
        try:
            async for output in choice.stream:
                if output.pooled is None:  # a vector is no token: TTFT and ITL are the generating requests'
                    timer.on_tokens(len(output.new_token_ids), output.queue_time_s)
                if output.is_finished:
                    timer.on_finish()
                queue.put_nowait((choice.index, output))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await _next_before(queue, deadline, timeout_s)
            if item is None:
                remaining -= 1
            elif item[1].error:
                raise output_error(item[1])
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for choice in choices:
            state.batcher.abort(choice.request_id)


async def _next_before(queue: asyncio.Queue[T], deadline: float | None, timeout_s: float | None) -> T:
    """``queue.get()``, or ``RequestTimeoutError`` once the loop clock passes ``deadline``."""
    if deadline is None:
        return await queue.get()
    remaining_s = max(deadline - asyncio.get_running_loop().time(), 0.0)
    try:
        return await asyncio.wait_for(queue.get(), remaining_s)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the request took longer than the server's request timeout ({timeout_s:g} s)") from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (aborting its requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
