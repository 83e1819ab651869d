"""One bench run: send every prompt on its arrival time, under a concurrency cap,
until all have finished or the time budget is spent.

Arrivals follow ``vllm bench serve``: with ``request_rate = inf`` every request
is released at t = 0; otherwise inter-arrival gaps are exponential with mean
``1 / request_rate`` (a Poisson process), seeded. A released request then waits
for one of ``max_concurrency`` slots (None: no cap). The run's duration is the
wall-clock time from the first release to the last completion.

The budget is a hard bound: when it runs out, every request still waiting or in
flight is cancelled (closing its connection, so the server can abort it) and
counted as failed with the error ``"deadline"``; the run still returns results.
"""

import asyncio
import contextlib
import math
import random
import sys
import time

import httpx
from tqdm import tqdm

from bench.client import Target, describe_exception, send_request
from bench.datasets import BenchPrompt
from bench.stats import RequestResult

CONNECT_TIMEOUT_S = 30.0
DEADLINE_ERROR = "deadline"


def poisson_arrivals_s(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Release time of each request in seconds from the start; all 0 for ``inf``."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    arrivals, now_s = [], 0.0
    for _ in range(num_requests):
        arrivals.append(now_s)
        now_s += rng.expovariate(request_rate)
    return arrivals


async def run_requests(
    target: Target,
    prompts: list[BenchPrompt],
    max_concurrency: int | None,
    request_rate: float,
    seed: int,
    budget_s: float,
    show_progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[RequestResult], float]:
    """Send ``prompts``; return one result per prompt (in order) and the duration in s.

    ``transport`` replaces the network (tests pass ``httpx.MockTransport``).
    """
    results: list[RequestResult | None] = [None] * len(prompts)
    if budget_s <= 0 or not prompts:
        return [_deadline_result() for _ in prompts], 0.0
    arrivals_s = poisson_arrivals_s(len(prompts), request_rate, seed)
    num_connections = max_concurrency or len(prompts)
    limits = httpx.Limits(max_connections=num_connections, max_keepalive_connections=num_connections)
    timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(prompts), desc=f"bench c={max_concurrency or 'inf'}", unit="req", file=sys.stderr, disable=not show_progress)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as client:
        start_s = time.perf_counter()

        async def one(index: int) -> None:
            await asyncio.sleep(max(0.0, start_s + arrivals_s[index] - time.perf_counter()))
            async with slots if slots is not None else contextlib.nullcontext():
                try:
                    results[index] = await send_request(client, target, prompts[index])
                except Exception as exc:  # noqa: BLE001 - a failure is a result, never a crash
                    results[index] = RequestResult(error=describe_exception(exc))
            bar.update(1)

        await _wait_or_cancel([asyncio.create_task(one(i)) for i in range(len(prompts))], budget_s)
        duration_s = time.perf_counter() - start_s
    bar.close()
    return [result or _deadline_result() for result in results], duration_s


async def _wait_or_cancel(tasks: list[asyncio.Task[None]], budget_s: float) -> None:
    """Wait for ``tasks`` at most ``budget_s``; cancel the rest and wait them out."""
    _, pending = await asyncio.wait(tasks, timeout=budget_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _deadline_result() -> RequestResult:
    return RequestResult(error=DEADLINE_ERROR)
