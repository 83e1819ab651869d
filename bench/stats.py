"""Serving metrics from per-request timings, defined as ``vllm bench serve`` does.

Pure functions over plain data, no I/O. One ``RequestResult`` per request comes
in (times in seconds, measured from the moment that request was sent); one
``RunMetrics`` per run comes out (latencies in milliseconds, throughputs per
second of the run's wall-clock duration).

The definitions (vLLM ``benchmarks/serve.py`` ``calculate_metrics``):

- TTFT: time to the first content chunk, per successful request.
- TPOT: ``(e2e - ttft) / (output_tokens - 1)`` per successful request with
  more than one output token (others are left out).
- ITL: the gaps between consecutive content chunks, pooled over all
  successful requests (a request with k content chunks adds k - 1 gaps).
- E2E latency: time from sending the request to its last content chunk.
- Throughputs divide by the run's duration: ``completed / duration`` requests,
  output tokens, and input + output tokens of successful requests.
- Percentiles interpolate linearly between order statistics, exactly like
  ``numpy.percentile``'s default; empty samples give 0 (as ``np.mean([] or 0)``).
"""

import math
from dataclasses import dataclass, field
from typing import Any

MAX_ERRORS_KEPT = 10
MS_PER_S = 1000.0


@dataclass(slots=True)
class RequestResult:
    """What one request measured. ``is_success`` needs at least one content chunk."""

    is_success: bool = False
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class LatencySummary:
    """Mean, median, p90 and p99 of one latency sample, in milliseconds."""

    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float


@dataclass(frozen=True)
class RunMetrics:
    """Every metric of one run; latencies in ms, throughputs per second."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencySummary
    tpot: LatencySummary
    itl: LatencySummary
    e2el: LatencySummary
    errors: tuple[str, ...]


def mean(values: list[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sample."""
    return math.fsum(values) / len(values) if values else 0.0


def percentile(values: list[float], pct: float) -> float:
    """``numpy.percentile(values, pct)`` (linear interpolation); 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * pct / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def summarize_ms(values_s: list[float]) -> LatencySummary:
    """Summarize latencies given in seconds as milliseconds."""
    return LatencySummary(
        mean_ms=mean(values_s) * MS_PER_S,
        median_ms=percentile(values_s, 50) * MS_PER_S,
        p90_ms=percentile(values_s, 90) * MS_PER_S,
        p99_ms=percentile(values_s, 99) * MS_PER_S,
    )


def request_tpot_s(result: RequestResult) -> float | None:
    """Time per output token after the first; None unless more than one token."""
    if not result.is_success or result.output_tokens <= 1:
        return None
    return (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)


def compute_metrics(results: list[RequestResult], duration_s: float) -> RunMetrics:
    """All metrics of one run from its per-request results and wall-clock duration."""
    successes = [r for r in results if r.is_success]
    total_input = sum(r.input_tokens for r in successes)
    total_output = sum(r.output_tokens for r in successes)
    tpots = [t for t in (request_tpot_s(r) for r in successes) if t is not None]
    itls = [gap for r in successes for gap in r.itls_s]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return RunMetrics(
        completed=len(successes),
        failed=len(results) - len(successes),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(successes) * per_s,
        output_throughput=total_output * per_s,
        total_token_throughput=(total_input + total_output) * per_s,
        ttft=summarize_ms([r.ttft_s for r in successes]),
        tpot=summarize_ms(tpots),
        itl=summarize_ms(itls),
        e2el=summarize_ms([r.e2e_s for r in successes]),
        errors=tuple(r.error for r in results if not r.is_success)[:MAX_ERRORS_KEPT],
    )


def metrics_to_dict(metrics: RunMetrics) -> dict[str, Any]:
    """Flat dict with ``vllm bench serve``'s result-JSON key names (``duration`` in s)."""
    flat: dict[str, Any] = {
        "completed": metrics.completed,
        "failed": metrics.failed,
        "duration": metrics.duration_s,
        "total_input_tokens": metrics.total_input_tokens,
        "total_output_tokens": metrics.total_output_tokens,
        "request_throughput": metrics.request_throughput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        summary: LatencySummary = getattr(metrics, name)
        flat[f"mean_{name}_ms"] = summary.mean_ms
        flat[f"median_{name}_ms"] = summary.median_ms
        flat[f"p90_{name}_ms"] = summary.p90_ms
        flat[f"p99_{name}_ms"] = summary.p99_ms
    flat["errors"] = list(metrics.errors)
    return flat
