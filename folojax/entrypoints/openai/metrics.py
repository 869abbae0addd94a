"""Prometheus metrics for /metrics, named like vLLM's with the prefix `folojax:`. Gauges read the
engine's last stats when scraped; counters and histograms are updated as requests advance."""

from __future__ import annotations

import time

import prometheus_client as prom

from folojax.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = prom.CollectorRegistry()  # one per app: servers in a process stay apart
        self.content_type = prom.CONTENT_TYPE_LATEST
        stats = lambda: engine.stats  # noqa: E731
        for name, doc, read in (
                ("num_requests_running", "requests in the running batch",
                 lambda: stats().num_requests_running),
                ("num_requests_waiting", "requests waiting to be scheduled",
                 lambda: stats().num_requests_waiting),
                ("kv_cache_usage_perc", "fraction of KV-cache blocks in use (0-1)",
                 lambda: stats().kv_cache_usage)):
            prom.Gauge(f"folojax:{name}", doc, registry=self.registry).set_function(read)
        self.prompt_tokens = prom.Counter("folojax:prompt_tokens", "prompt tokens processed",
                                          registry=self.registry)
        self.generation_tokens = prom.Counter("folojax:generation_tokens",
                                              "tokens generated", registry=self.registry)
        self.request_success = prom.Counter("folojax:request_success",
                                            "requests finished, by finish reason (abort: the "
                                            "client went away)",
                                            ["finished_reason"], registry=self.registry)
        self.ttft = prom.Histogram("folojax:time_to_first_token_seconds",
                                   "time to the first token", buckets=LATENCY_BUCKETS,
                                   registry=self.registry)
        self.itl = prom.Histogram("folojax:inter_token_latency_seconds",
                                  "time between output tokens", buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self.e2e = prom.Histogram("folojax:e2e_request_latency_seconds",
                                  "time from arrival to the last token", buckets=LATENCY_BUCKETS,
                                  registry=self.registry)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)

    def track(self, prompt_token_ids: list[int], n: int = 1) -> RequestHistory:
        return RequestHistory(self, len(prompt_token_ids), n)


class RequestHistory:
    """One request's latencies as its outputs arrive (counted when it finishes, or when it is
    aborted: its n completions as finished_reason "abort", as vLLM counts them)."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int, n: int = 1):
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n
        self.start = self.last = time.perf_counter()
        self.num_tokens = 0
        self.done = False

    def update(self, output: RequestOutput) -> None:
        if self.done:
            return
        now = time.perf_counter()
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        new = num_tokens - self.num_tokens
        if new > 0:
            if self.num_tokens == 0:
                self.metrics.ttft.observe(now - self.start)
                new -= 1
            for _ in range(new):
                self.metrics.itl.observe((now - self.last) / max(new, 1))
            self.num_tokens, self.last = num_tokens, now
        if output.finished:
            self.done = True
            metrics = self.metrics
            metrics.e2e.observe(now - self.start)
            metrics.prompt_tokens.inc(self.num_prompt_tokens)
            metrics.generation_tokens.inc(num_tokens)
            for completion in output.outputs:
                metrics.request_success.labels(completion.finish_reason or "abort").inc()

    def aborted(self) -> None:
        """The request stopped before it finished (its client went away)."""
        if not self.done:
            self.done = True
            self.metrics.request_success.labels("abort").inc(self.n)
