"""Prometheus metrics at /metrics, named as vLLM's with the `uora_rt:` prefix (a vLLM dashboard
needs only the prefix changed).

Engine state (running / waiting requests, KV blocks, output tokens per second over the last
10 s) is read when scraped; latencies are observed by the request handlers as outputs reach
them: time to first token (from the request's arrival at the server), time per output token
(per request: (finish - first token) / (tokens - 1)), inter-token latency (per streamed step),
end-to-end latency. Requests are counted per `model` (the adapter name, or the base name), and
so are the prompt tokens looked up in the prefix cache and found there (prefix_cache_queries,
prefix_cache_hits: the engine's counts, read when scraped).
Each app has its own registry, so several servers in one process do not collide.
"""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0)
_PER_TOKEN = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
              0.5, 0.75, 1.0, 2.5)
P = "uora_rt:"
# Adapters that get their own prefix-cache series (the first this many names the engine saw);
# later names add to model="other", so the series stay bounded however many adapters come
# and go.
PREFIX_CACHE_LABELS = 64
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineGauges:
    """A custom collector: reads the engine's figures when scraped."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        e, m = self.m.engine, self.m
        s = e.stats  # the engine core's latest: after its last step, or as it went idle
        rows = [("num_requests_running", "requests in the running batch", s.running),
                ("num_requests_waiting", "requests accepted and waiting to run", s.waiting),
                ("kv_blocks_used", "KV cache blocks held by requests", s.blocks_used),
                ("kv_blocks_total", "KV cache blocks in the pool", s.blocks_total),
                ("kv_cache_usage_perc", "fraction of the KV cache in use",
                 s.blocks_used / max(s.blocks_total, 1)),
                ("kv_blocks_cached", "KV cache blocks holding a reusable prefix (held or "
                 "free)", s.blocks_cached),
                ("generation_tokens_per_second", "output tokens per second, last 10 s",
                 m.tokens_per_second()),
                ("num_adapters", "adapters loaded", len(e.adapters))]
        for name, doc, value in rows:
            yield GaugeMetricFamily(P + name, doc, value=value)
        per_model = GaugeMetricFamily(P + "num_requests_in_flight", "requests being served, "
                                      "per model (adapter or base)", labels=["model"])
        for model, n in sorted(m.in_flight.items()):
            per_model.add_metric([model], n)
        yield per_model
        yield from self._prefix_cache(s)

    def _prefix_cache(self, s):
        """Prompt tokens looked up in the prefix cache and found there, per model, counted by
        the engine when each request first runs."""
        rows: dict[str, list[int]] = {}
        for i, (name, queries, hits) in enumerate(s.prefix):
            label = self.m.base_name if name == "" else \
                name if i < PREFIX_CACHE_LABELS else "other"
            row = rows.setdefault(label, [0, 0])
            row[0] += queries
            row[1] += hits
        for i, (metric, doc) in enumerate((
                ("prefix_cache_queries", "prompt tokens looked up in the prefix cache"),
                ("prefix_cache_hits", "prompt tokens found in the prefix cache (not computed)"))):
            family = CounterMetricFamily(P + metric, doc + ", per model", labels=["model"])
            for label, row in sorted(rows.items()):
                family.add_metric([label], row[i])
            yield family


class Metrics:
    def __init__(self, engine, window_s: float = 10.0, base_name: str = "base"):
        """engine: the server's engine handle (engine.client.CoreClient or local.LocalEngine)."""
        self.engine, self.window_s, self.base_name = engine, window_s, base_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(P + "time_to_first_token_seconds", "time to first token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "per request: (finish - "
                              "first token) / (output tokens - 1)", buckets=_PER_TOKEN, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "time between a request's "
                             "consecutive outputs", buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "output tokens", registry=r)
        self.requests = Counter(P + "requests", "requests accepted, per model", ["model"],
                                registry=r)
        self.finished = Counter(P + "request_success", "requests finished, per model and reason "
                                "(stop, length, abort = client gone, error)",
                                ["model", "finished_reason"], registry=r)
        self.rejected = Counter(P + "requests_rejected", "requests refused before running, per "
                                "reason", ["reason"], registry=r)
        r.register(_EngineGauges(self))
        self.in_flight: dict[str, int] = collections.Counter()
        self._recent: collections.deque = collections.deque()  # (time, tokens)
        self._start = time.perf_counter()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        span = min(self.window_s, now - self._start)
        return sum(n for _, n in self._recent) / span if span > 0 else 0.0

    def tracker(self, model: str) -> RequestTracker:
        return RequestTracker(self, model)


class RequestTracker:
    """One engine request as the handler sees it: feed it every output, then finish it."""

    def __init__(self, metrics: Metrics, model: str):
        self.m, self.model = metrics, model
        self.arrival = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.cached_tokens = 0
        self.done = False
        metrics.requests.labels(model).inc()
        metrics.in_flight[model] += 1

    def output(self, out) -> None:
        self.cached_tokens = out.cached_tokens
        n = len(out.new_token_ids)
        if n == 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.tokens += n
        self.m.generation_tokens.inc(n)
        self.m._recent.append((now, n))

    def finish(self, reason: str, prompt_tokens: int = 0) -> None:
        if self.done:
            return
        self.done = True
        m = self.m
        m.in_flight[self.model] -= 1
        if m.in_flight[self.model] == 0:
            del m.in_flight[self.model]
        m.finished.labels(self.model, reason).inc()
        m.prompt_tokens.inc(prompt_tokens)
        if reason in ("stop", "length"):
            now = time.perf_counter()
            m.e2e.observe(now - self.arrival)
            if self.tokens > 1:
                m.tpot.observe((self.last - self.first) / (self.tokens - 1))
