"""Bench output: the printed tables, the result JSON and the matplotlib plots.

A ``BenchRun`` holds one run's configuration (plain JSON values), its
``RunMetrics`` and its per-request results. A single run's JSON is one object;
a sweep's is a list of them, in concurrency order. Each object holds the
configuration, every metric under ``vllm bench serve``'s key names (latencies
in ms, ``duration`` in s, throughputs per s), the first few ``errors``, and
per-request ``input_lens``, ``output_lens``, ``ttfts`` and ``e2els`` (s; 0
for failed requests, as vLLM writes them) and ``error_counts`` (message → count).
"""

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import LatencySummary, RequestResult, RunMetrics, metrics_to_dict

WIDTH = 50
MAX_ERRORS_PRINTED = 5


@dataclass(frozen=True)
class BenchRun:
    """One run: configuration, metrics and per-request results."""

    config: dict[str, Any]
    metrics: RunMetrics
    results: list[RequestResult]

    def to_dict(self) -> dict[str, Any]:
        """The run as a JSON-ready dict (config first, then metrics and per-request lists)."""
        return {
            **self.config,
            **metrics_to_dict(self.metrics),
            "input_lens": [r.input_tokens for r in self.results],
            "output_lens": [r.output_tokens if r.is_success else 0 for r in self.results],
            "ttfts": [r.ttft_s if r.is_success else 0.0 for r in self.results],
            "e2els": [r.e2e_s if r.is_success else 0.0 for r in self.results],
            "error_counts": dict(error_counts(self.results)),
        }


def error_counts(results: list[RequestResult]) -> Counter[str]:
    """How many failed requests gave each error message."""
    return Counter(r.error for r in results if not r.is_success)


def json_value(value: float) -> float | str:
    """``inf`` as the string ``"inf"`` (JSON has no infinity), like vLLM writes it."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _row(label: str, value: float | int | str) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<34}{text:>16}"


def _title(text: str, fill: str = "-") -> str:
    return f"{text:{fill}^{WIDTH}}"


def _latency_rows(name: str, title: str, summary: LatencySummary) -> list[str]:
    return [
        _title(title),
        _row(f"Mean {name} (ms):", summary.mean_ms),
        _row(f"Median {name} (ms):", summary.median_ms),
        _row(f"P90 {name} (ms):", summary.p90_ms),
        _row(f"P99 {name} (ms):", summary.p99_ms),
    ]


def format_run_table(run: BenchRun) -> str:
    """The human-readable result table of one run (``vllm bench serve``'s layout)."""
    metrics, config = run.metrics, run.config
    lines = [
        _title(" Serving Benchmark Result ", "="),
        _row("Label:", str(config.get("label") or "-")),
        _row("Model:", str(config.get("model") or "-")),
        _row("Endpoint:", str(config.get("endpoint"))),
        _row("Max concurrency:", str(config.get("max_concurrency") or "inf")),
        _row("Request rate (req/s):", str(config.get("request_rate"))),
        _row("Successful requests:", metrics.completed),
        _row("Failed requests:", metrics.failed),
        _row("Benchmark duration (s):", metrics.duration_s),
        _row("Total input tokens:", metrics.total_input_tokens),
        _row("Total generated tokens:", metrics.total_output_tokens),
        _row("Request throughput (req/s):", metrics.request_throughput),
        _row("Output token throughput (tok/s):", metrics.output_throughput),
        _row("Total token throughput (tok/s):", metrics.total_token_throughput),
        *_latency_rows("TTFT", "Time to First Token", metrics.ttft),
        *_latency_rows("TPOT", "Time per Output Token (excl. 1st token)", metrics.tpot),
        *_latency_rows("ITL", "Inter-token Latency", metrics.itl),
        *_latency_rows("E2EL", "End-to-end Latency", metrics.e2el),
    ]
    if metrics.failed:
        lines.append(_title(" Errors (count x message) "))
        lines.extend(f"  {count} x {error}" for error, count in error_counts(run.results).most_common(MAX_ERRORS_PRINTED))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep_table(runs: list[BenchRun]) -> str:
    """One line per concurrency level: counts, throughputs and p50/p99 latencies."""
    header = (
        f"{'conc':>6} {'ok':>5} {'fail':>5} {'req/s':>8} {'out tok/s':>10} {'tot tok/s':>10} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'E2E p50':>9}"
    )
    lines = [_title(" Concurrency sweep (latencies in ms) ", "="), header]
    for run in runs:
        m = run.metrics
        lines.append(
            f"{run.config.get('max_concurrency') or 'inf':>6} {m.completed:>5} {m.failed:>5} {m.request_throughput:>8.2f} "
            f"{m.output_throughput:>10.2f} {m.total_token_throughput:>10.2f} {m.ttft.median_ms:>9.1f} {m.ttft.p99_ms:>9.1f} "
            f"{m.itl.median_ms:>8.1f} {m.itl.p99_ms:>8.1f} {m.e2el.median_ms:>9.1f}"
        )
    return "\n".join(lines)


def write_result_json(path: Path, runs: list[BenchRun], is_sweep: bool) -> None:
    """Write one run as an object, or a sweep as a list of objects."""
    payload: Any = [run.to_dict() for run in runs] if is_sweep else runs[0].to_dict()
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def plot_runs(path: Path, runs: list[BenchRun], is_sweep: bool) -> None:
    """PNG via matplotlib's Agg backend: sweep curves, or one run's latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if is_sweep:
        figure = _plot_sweep(plt, runs)
    else:
        figure = _plot_cdf(plt, runs[0])
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def _plot_sweep(plt: Any, runs: list[BenchRun]) -> Any:
    """Throughput, TTFT and ITL percentiles against concurrency (log2 x axis)."""
    levels = [run.config.get("max_concurrency") or len(run.results) for run in runs]
    figure, (ax_tput, ax_ttft, ax_itl) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax_tput.plot(levels, [r.metrics.output_throughput for r in runs], "o-", label="output tok/s")
    ax_tput.plot(levels, [r.metrics.total_token_throughput for r in runs], "s--", label="total tok/s")
    ax_tput.set_title("Throughput")
    ax_tput.set_ylabel("tokens / s")
    for axis, name, title in ((ax_ttft, "ttft", "TTFT"), (ax_itl, "itl", "ITL")):
        for pct, style in (("median_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            axis.plot(
                levels, [getattr(getattr(r.metrics, name), pct) for r in runs], style, label=pct.replace("_ms", "").replace("median", "p50")
            )
        axis.set_title(f"{title} percentiles")
        axis.set_ylabel("ms")
    for axis in (ax_tput, ax_ttft, ax_itl):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("max concurrency")
        axis.grid(True, alpha=0.3)
        axis.legend()
    label = runs[0].config.get("label")
    if label:
        figure.suptitle(str(label))
    return figure


def _plot_cdf(plt: Any, run: BenchRun) -> Any:
    """Empirical CDFs of TTFT and end-to-end latency of the successful requests."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    successes = [r for r in run.results if r.is_success]
    for name, values_s in (("TTFT", [r.ttft_s for r in successes]), ("E2E", [r.e2e_s for r in successes])):
        ordered_ms = sorted(v * 1000.0 for v in values_s)
        fractions = [(i + 1) / len(ordered_ms) for i in range(len(ordered_ms))]
        axis.step(ordered_ms, fractions, where="post", label=f"{name} (n={len(ordered_ms)})")
    axis.set_xlabel("latency (ms)")
    axis.set_ylabel("fraction of requests")
    axis.set_ylim(0, 1.02)
    axis.grid(True, alpha=0.3)
    axis.legend()
    title = f"Latency CDF, concurrency {run.config.get('max_concurrency') or 'inf'}"
    axis.set_title(f"{run.config['label']}: {title}" if run.config.get("label") else title)
    return figure
