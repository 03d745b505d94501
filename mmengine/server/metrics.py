"""Prometheus metrics of the server: requests, tokens, latencies and the engine's state.

Per-request numbers are recorded by the serving code as requests finish; the engine's
gauges (queues, KV blocks, cache hit rates, preemptions) are read from
``await engine.stats()`` when ``/metrics`` is scraped, so they are never stale and cost
nothing between scrapes. Each app has its own registry (tests run several apps at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mmengine.outputs import RequestOutput

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Paths reported by name; anything else is "other" so random URLs cannot grow the label set.
KNOWN_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/version",
    "/metrics",
)


class ServerMetrics:
    """The server's metrics registry and the hooks that fill it."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.http_requests = Counter(
            "mmengine:http_requests",
            "HTTP requests by route and status code (499: client left).",
            ["route", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "mmengine:http_requests_in_flight", "Inference requests being served now.", registry=r
        )
        self.finished = Counter(
            "mmengine:request_success",
            "Completions finished, by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mmengine:prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "mmengine:generation_tokens", "Tokens generated for finished requests.", registry=r
        )
        self.ttft = Histogram(
            "mmengine:time_to_first_token_seconds",
            "Request arrival to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "mmengine:time_per_output_token_seconds",
            "Mean time between output tokens.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mmengine:e2e_request_latency_seconds",
            "Request arrival to last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._engine = _EngineCollector(labels)
        r.register(self._engine)

    def record_http(self, path: str, status: int) -> None:
        route = path if path in KNOWN_ROUTES else "other"
        self.http_requests.labels(route=route, status=str(status)).inc()

    def record_finished(self, outputs: list[RequestOutput], arrival: float, end: float) -> None:
        """Counts tokens and latencies of finished prompts (times from time.monotonic())."""
        for out in outputs:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            first = out.metrics.get("first_token_time")
            if first is not None:
                self.ttft.observe(max(first - arrival, 0.0))
            self.e2e.observe(max(end - arrival, 0.0))
            for c in out.outputs:
                self.generation_tokens.inc(len(c.token_ids))
                self.finished.labels(finished_reason=c.finish_reason or "unknown").inc()
                if first is not None and len(c.token_ids) > 1:
                    self.tpot.observe(max(end - first, 0.0) / (len(c.token_ids) - 1))

    async def render(self) -> bytes:
        """The exposition text, with the engine's gauges refreshed first."""
        try:
            self._engine.stats = await asyncio.wait_for(self.engine.stats(), 5.0)
            self._engine.healthy = self.engine.is_healthy()
        except Exception as e:  # a dead or stuck engine still lets /metrics answer
            logger.warning("could not read engine stats for /metrics: %s", type(e).__name__)
            self._engine.stats = None
            self._engine.healthy = False
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Yields the engine's counters from the last stats snapshot."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.stats: dict[str, Any] | None = None
        self.healthy = True

    def collect(self) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"mmengine:{name}", doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"mmengine:{name}", doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("engine_healthy", "1 while the engine core is running.", float(self.healthy))
        s = self.stats
        if s is None:
            return
        yield gauge(
            "num_requests_running", "Requests in the engine's running batch.", s["num_running"]
        )
        yield gauge("num_requests_waiting", "Requests queued in the engine.", s["num_waiting"])
        yield gauge("kv_cache_blocks_used", "KV blocks held by requests.", s["kv_blocks_used"])
        yield gauge("kv_cache_blocks_total", "KV blocks in the pool.", s["kv_blocks_total"])
        usage = s["kv_blocks_used"] / max(s["kv_blocks_total"], 1)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use.", usage)
        queried, hits = s["prefix_cache_queried_tokens"], s["prefix_cache_hit_tokens"]
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queried
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries.", hits / max(queried, 1))
        yield counter(
            "mm_prefix_cache_hits",
            "Prompt tokens found in the prefix cache in blocks that hold image/video tokens.",
            s["mm_prefix_cache_hit_tokens"],
        )
        emb_hits, emb_misses = s["embedding_cache_hits"], s["embedding_cache_misses"]
        yield counter(
            "embedding_cache_hits", "Images/videos whose embeddings came from the cache.", emb_hits
        )
        yield counter(
            "embedding_cache_misses", "Images/videos the vision encoder had to run on.", emb_misses
        )
        yield gauge(
            "embedding_cache_hit_rate",
            "Vision-embedding cache hits / lookups.",
            emb_hits / max(emb_hits + emb_misses, 1),
        )
        yield counter("encoder_runs", "Vision-encoder forward passes.", s["encoder_runs"])
        yield counter(
            "input_worker_restarts",
            "Input-processing worker pools replaced after a worker died or hung.",
            s.get("input_worker_restarts", 0),
        )
        yield counter(
            "num_preemptions", "Requests preempted (recomputed) for KV space.", s["num_preemptions"]
        )
