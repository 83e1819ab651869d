"""Prometheus metrics at ``GET /metrics`` (prometheus-client, one registry per app).

Engine state (running/waiting requests, KV usage, token and preemption
counters, prefix-cache counters, step time) is read at scrape time from the
batcher's ``EngineStats`` snapshot by a custom collector, so the engine loop
pays nothing for it and the server never reaches into the scheduler. Latency histograms
are observed by the routes as deltas stream out.
"""

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batching.batcher import DynamicBatcher

disable_created_metrics()  # the *_created series only add noise to scrapes

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Reads the live engine at scrape time; reports nothing while loading."""

    def __init__(self, get_batcher: Callable[[], DynamicBatcher | None]) -> None:
        self._get_batcher = get_batcher

    def collect(self) -> Iterator[Metric]:
        batcher = self._get_batcher()
        if batcher is None:
            return
        stats = batcher.stats()
        yield GaugeMetricFamily("tokenstep_num_requests_running", "Requests in the running batch.", value=stats.num_running)
        yield GaugeMetricFamily("tokenstep_num_requests_waiting", "Requests waiting for admission.", value=stats.num_waiting)
        yield GaugeMetricFamily("tokenstep_kv_cache_usage_ratio", "Fraction of KV blocks in use (0-1).", value=stats.kv_cache_usage)
        yield CounterMetricFamily("tokenstep_prompt_tokens", "Prompt tokens admitted.", value=stats.num_prompt_tokens_total)
        yield CounterMetricFamily("tokenstep_generation_tokens", "Tokens generated.", value=stats.num_generation_tokens_total)
        yield CounterMetricFamily(
            "tokenstep_num_preemptions", "Requests preempted for lack of KV blocks.", value=stats.num_preemptions_total
        )
        yield CounterMetricFamily(
            "tokenstep_prefix_cache_queries", "Tokens looked up in the prefix cache.", value=stats.prefix_cache_query_tokens_total
        )
        yield CounterMetricFamily(
            "tokenstep_prefix_cache_hits", "Tokens served from the prefix cache.", value=stats.prefix_cache_hit_tokens_total
        )
        yield CounterMetricFamily(
            "tokenstep_spec_decode_num_draft_tokens",
            "Draft tokens proposed (speculative decoding: n-gram lookup or a draft model).",
            value=stats.spec_draft_tokens_total,
        )
        yield CounterMetricFamily(
            "tokenstep_spec_decode_num_accepted_tokens", "Draft tokens the model agreed with.", value=stats.spec_accepted_tokens_total
        )
        yield CounterMetricFamily(
            "tokenstep_pooled_requests", "Pooling requests (embedding inputs) answered with a vector.", value=stats.num_pooled_total
        )
        yield CounterMetricFamily("tokenstep_engine_steps", "Engine iterations run.", value=stats.num_steps_total)
        yield CounterMetricFamily("tokenstep_engine_step_seconds", "Wall time spent in model steps.", value=stats.step_seconds_total)


class Metrics:
    """The app's registry plus the histograms the routes observe."""

    def __init__(self, get_batcher: Callable[[], DynamicBatcher | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(get_batcher))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS_S, registry=self.registry)

        self.ttft_s = histogram("tokenstep_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl_s = histogram("tokenstep_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.e2e_s = histogram("tokenstep_e2e_request_latency_seconds", "Time from request arrival to its last token.")
        self.queue_s = histogram("tokenstep_request_queue_time_seconds", "Time from arrival to first scheduling.")

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's TTFT, ITLs, queue time and end-to-end latency."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last_token_time: float | None = None

    def on_tokens(self, num_tokens: int, queue_time_s: float | None) -> None:
        now = time.monotonic()
        if self.last_token_time is None:
            self.metrics.ttft_s.observe(now - self.start)
            if queue_time_s is not None:
                self.metrics.queue_s.observe(max(queue_time_s, 0.0))
        elif num_tokens:
            self.metrics.itl_s.observe((now - self.last_token_time) / num_tokens)
        if num_tokens:
            self.last_token_time = now

    def on_finish(self) -> None:
        self.metrics.e2e_s.observe(time.monotonic() - self.start)
