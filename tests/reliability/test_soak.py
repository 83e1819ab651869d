"""Soak: 32 clients in flight for ``TOKENSTEP_SOAK_SECONDS`` (15 s by default;
120 s for the figures in docs/RELIABILITY.md), mixing streaming and
non-streaming completions and chat, greedy and sampled, n = 1 or 2, with
random disconnects. Reports requests, tokens, errors, peak RSS and RSS growth
of the server process; asserts no 5xx, no error event and no leaked block.

    TOKENSTEP_SOAK_SECONDS=120 .venv/bin/python -m pytest tests/reliability/test_soak.py -s

prints the report; ``TOKENSTEP_SOAK_REPORT=path.json`` also writes it there.
"""

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.reliability.support import parse_stream, wait_engine_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

SOAK_SECONDS = float(os.environ.get("TOKENSTEP_SOAK_SECONDS", "15"))
CONCURRENCY = 32
DISCONNECT_RATE = 0.2
WARMUP_S = SOAK_SECONDS / 5  # RSS growth is measured from here on (allocator and caches warm up first)
MAX_RSS_GROWTH_MIB = 256  # a leak tripwire, far above what a healthy run shows
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls count stars".split()
SYSTEM_PREFIX = "You are a helpful assistant. Answer briefly and precisely. "  # shared prefix: exercises the prefix cache


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: int = 0
    completed: int = 0
    disconnects: int = 0
    completion_tokens: int = 0
    statuses: Counter = field(default_factory=Counter)
    error_events: int = 0
    rss_start_mib: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_timeline_mib: list[float] = field(default_factory=list)  # one sample per tenth of the run

    @property
    def num_5xx(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field_name} not in /proc/{pid}/status")


def random_request(rng: random.Random) -> tuple[str, dict]:
    text = SYSTEM_PREFIX * rng.randint(0, 1) + " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
    body: dict = {"model": "tiny", "max_tokens": rng.randint(1, 48), "stream": rng.random() < 0.5, "n": rng.choice([1, 1, 1, 2])}
    if rng.random() < 0.5:
        body |= {"temperature": 0}
    else:
        body |= {"temperature": 0.8, "top_p": 0.9, "seed": rng.randint(0, 1000) if rng.random() < 0.5 else None}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        return "/v1/completions", body | {"prompt": text}
    return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": text}]}


async def one_request(client: httpx.AsyncClient, rng: random.Random, report: SoakReport) -> None:
    path, body = random_request(rng)
    disconnect_after_s = rng.uniform(0.0, 0.5) if rng.random() < DISCONNECT_RATE else None
    report.requests += 1
    task = asyncio.create_task(client.post(path, json=body))
    if disconnect_after_s is not None:
        done, _ = await asyncio.wait({task}, timeout=disconnect_after_s)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            report.disconnects += 1
            return
    response = await task
    report.statuses[response.status_code] += 1
    if response.status_code != 200:
        return
    if body["stream"]:
        stream = parse_stream(200, response.text)
        stream.assert_ended_properly()
        report.error_events += len(stream.errors)
        usage = stream.events[-1].get("usage") if stream.events else None
    else:
        usage = response.json()["usage"]
    report.completed += 1
    report.completion_tokens += usage["completion_tokens"] if usage else 0


async def client_loop(client: httpx.AsyncClient, seed: int, deadline: float, report: SoakReport) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        await one_request(client, rng, report)


async def watch_rss(pid: int, report: SoakReport, started: float, stop: asyncio.Event) -> None:
    next_sample = started
    while not stop.is_set():
        now = time.monotonic()
        if not report.rss_after_warmup_mib and now - started >= WARMUP_S:
            report.rss_after_warmup_mib = rss_mib(pid)
        if now >= next_sample:
            report.rss_timeline_mib.append(round(rss_mib(pid), 1))
            next_sample += SOAK_SECONDS / 10
        await asyncio.sleep(0.25)


async def test_soak(storm_server):
    pid, report = storm_server.process.pid, SoakReport()
    report.rss_start_mib = rss_mib(pid)
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=storm_server.base_url, timeout=120, limits=limits) as client:
        started, stop = time.monotonic(), asyncio.Event()
        watcher = asyncio.create_task(watch_rss(pid, report, started, stop))
        await asyncio.gather(*[client_loop(client, seed, started + SOAK_SECONDS, report) for seed in range(CONCURRENCY)])
        report.seconds = round(time.monotonic() - started, 1)
        stop.set()
        await watcher
        engine_state = await wait_engine_idle(client)
    report.rss_end_mib, report.rss_peak_mib = rss_mib(pid), rss_mib(pid, "VmHWM")
    for name in ("rss_start_mib", "rss_after_warmup_mib", "rss_end_mib", "rss_peak_mib"):
        setattr(report, name, round(getattr(report, name), 1))

    summary = asdict(report) | {
        "statuses": dict(report.statuses),
        "num_5xx": report.num_5xx,
        "rss_growth_mib": round(report.rss_end_mib - report.rss_after_warmup_mib, 1),
        "engine_state_after": engine_state,
    }
    print("\nsoak report:", json.dumps(summary))
    if os.environ.get("TOKENSTEP_SOAK_REPORT"):
        Path(os.environ["TOKENSTEP_SOAK_REPORT"]).write_text(json.dumps(summary, indent=2) + "\n")

    assert report.num_5xx == 0 and report.error_events == 0, summary
    assert set(report.statuses) == {200}, summary
    assert report.completed > CONCURRENCY and report.disconnects > 0, summary
    assert engine_state == [0.0, 0.0, 0.0], f"leaked requests or KV blocks: {summary}"
    assert summary["rss_growth_mib"] < MAX_RSS_GROWTH_MIB, summary
