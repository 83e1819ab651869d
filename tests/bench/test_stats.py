"""Every metric from a hand-built timing sequence, with hand-computed values."""

import math
import random

import numpy as np
import pytest

from bench.stats import RequestResult, compute_metrics, mean, metrics_to_dict, percentile, request_tpot_s


def fake_results() -> list[RequestResult]:
    """Five requests over a 2 s run; one failed, one with a single token."""
    return [
        RequestResult(is_success=True, ttft_s=0.1, itls_s=[0.02, 0.04, 0.03], e2e_s=0.19, input_tokens=10, output_tokens=4),
        RequestResult(is_success=True, ttft_s=0.2, itls_s=[0.05], e2e_s=0.25, input_tokens=10, output_tokens=2),
        RequestResult(is_success=True, ttft_s=0.3, itls_s=[], e2e_s=0.3, input_tokens=10, output_tokens=1),
        RequestResult(is_success=False, input_tokens=10, error="HTTP 500: boom"),
        RequestResult(is_success=True, ttft_s=0.4, itls_s=[0.01, 0.01], e2e_s=0.42, input_tokens=10, output_tokens=3),
    ]


def test_counts_and_throughput() -> None:
    metrics = compute_metrics(fake_results(), duration_s=2.0)
    assert (metrics.completed, metrics.failed) == (4, 1)
    assert metrics.duration_s == 2.0
    # failed requests contribute no tokens
    assert (metrics.total_input_tokens, metrics.total_output_tokens) == (40, 10)
    assert metrics.request_throughput == pytest.approx(4 / 2.0)
    assert metrics.output_throughput == pytest.approx(10 / 2.0)
    assert metrics.total_token_throughput == pytest.approx(50 / 2.0)
    assert metrics.errors == ("HTTP 500: boom",)


def test_ttft() -> None:
    ttft = compute_metrics(fake_results(), 2.0).ttft
    # sorted [100, 200, 300, 400] ms; p90 at rank 2.7, p99 at rank 2.97
    assert ttft.mean_ms == pytest.approx(250.0)
    assert ttft.median_ms == pytest.approx(250.0)
    assert ttft.p90_ms == pytest.approx(370.0)
    assert ttft.p99_ms == pytest.approx(397.0)


def test_tpot_skips_single_token_requests() -> None:
    results = fake_results()
    assert request_tpot_s(results[0]) == pytest.approx((0.19 - 0.1) / 3)
    assert request_tpot_s(results[2]) is None  # one token: no TPOT
    assert request_tpot_s(results[3]) is None  # failed
    tpot = compute_metrics(results, 2.0).tpot
    # per request: 30, 50, 10 ms -> sorted [10, 30, 50]
    assert tpot.mean_ms == pytest.approx(30.0)
    assert tpot.median_ms == pytest.approx(30.0)
    assert tpot.p90_ms == pytest.approx(46.0)
    assert tpot.p99_ms == pytest.approx(49.6)


def test_itl_pools_gaps_over_requests() -> None:
    itl = compute_metrics(fake_results(), 2.0).itl
    # pooled [20, 40, 30, 50, 10, 10] ms -> sorted [10, 10, 20, 30, 40, 50]
    assert itl.mean_ms == pytest.approx(160.0 / 6)
    assert itl.median_ms == pytest.approx(25.0)
    assert itl.p90_ms == pytest.approx(45.0)
    assert itl.p99_ms == pytest.approx(49.5)


def test_e2e_latency() -> None:
    e2el = compute_metrics(fake_results(), 2.0).e2el
    # sorted [190, 250, 300, 420] ms
    assert e2el.mean_ms == pytest.approx(290.0)
    assert e2el.median_ms == pytest.approx(275.0)
    assert e2el.p90_ms == pytest.approx(384.0)
    assert e2el.p99_ms == pytest.approx(416.4)


def test_all_failed_gives_zeros_not_errors() -> None:
    metrics = compute_metrics([RequestResult(error="x")] * 3, duration_s=0.0)
    assert (metrics.completed, metrics.failed) == (0, 3)
    assert metrics.request_throughput == 0.0
    assert metrics.ttft.mean_ms == metrics.itl.p99_ms == metrics.tpot.median_ms == 0.0


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    for size in (1, 2, 5, 64, 101):
        values = [rng.expovariate(3.0) for _ in range(size)]
        for pct in (0, 10, 50, 90, 99, 100):
            assert percentile(values, pct) == pytest.approx(float(np.percentile(values, pct)))
        assert mean(values) == pytest.approx(float(np.mean(values)))
    assert percentile([], 50) == 0.0 and mean([]) == 0.0


def test_dict_uses_vllm_key_names() -> None:
    flat = metrics_to_dict(compute_metrics(fake_results(), 2.0))
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            assert math.isfinite(flat[f"{stat}_{name}_ms"])
    assert flat["p99_itl_ms"] == pytest.approx(49.5)
    assert {"completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput", "errors"} <= flat.keys()
