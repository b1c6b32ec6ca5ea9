"""Serving metrics: Prometheus text at the ingress's `GET /metrics`, mirrored into Ray Serve's metrics.

The ingress measures what a client sees (time to first token, inter-token latency, end-to-end latency, tokens,
requests by endpoint and status, prefill/decode split) in its own `prometheus_client` registry; the engine gauges
(queue length, running sequences, KV usage, prefill counts) are read from the engine replicas at scrape time.
With several ingress replicas each has its own registry (Prometheus behind the Serve proxy sees one per scrape);
the `ray.serve.metrics` copies aggregate across replicas in Ray's own Prometheus endpoint.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# Engine.stats() keys exported as gauges (counters of the engine are exported as gauges too: they restart with
# their replica, which a Prometheus counter must not do).
ENGINE_KEYS = (
    "waiting", "running", "running_seqs", "kv_usage", "kv_used_tokens", "kv_cached_tokens", "kv_budget_tokens",
    "free_rows", "prefills_local", "prefills_imported", "requests_finished", "tokens_generated",
)  # fmt: skip


class _EngineCollector:
    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []  # one Engine.stats() per replica, with deployment and replica

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for key in ENGINE_KEYS:
            fam = GaugeMetricFamily(f"ernie_engine_{key}", f"Engine.stats()['{key}'] per replica",
                                    labels=["deployment", "replica"])  # fmt: skip
            for s in self.samples:
                if key in s:
                    fam.add_metric([s["deployment"], s["replica"]], float(s[key]))
            yield fam


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ernie_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("ernie_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("ernie_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("ernie_time_to_first_token_seconds", "request arrival to first token at the ingress",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("ernie_inter_token_latency_seconds", "gap between a request's tokens at the ingress",
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("ernie_e2e_request_latency_seconds", "request arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.routes = Counter("ernie_prefill_route", "where prompts were prefilled: disaggregated (Prefill replica, "
                              "KV sent to Decode) or local (on the decode/colocated replica)", ["route"],
                              registry=r)  # fmt: skip
        self.in_flight = Gauge("ernie_requests_in_flight", "requests being served by this ingress", registry=r)
        self.retries = Counter("ernie_engine_retries", "requests re-run after an engine replica failed", registry=r)
        self.engine = _EngineCollector()
        r.register(self.engine)
        self._ray = _ray_metrics()

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        if self._ray:
            self._ray["ttft"].observe(seconds)

    def observe_itl(self, seconds: float, tokens: int) -> None:
        """A chunk of `tokens` tokens arrived `seconds` after the previous one: each token gets an equal share."""
        per = seconds / max(tokens, 1)
        for _ in range(tokens):
            self.itl.observe(per)
        if self._ray:  # one sample per chunk: Ray's metric calls cost far more than prometheus_client's
            self._ray["itl"].observe(per)

    def request_done(self, endpoint: str, status: int, prompt_tokens: int = 0, gen_tokens: int = 0,
                     seconds: float | None = None) -> None:  # fmt: skip
        self.requests.labels(endpoint, str(status)).inc()
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if gen_tokens:
            self.generation_tokens.inc(gen_tokens)
        if seconds is not None:
            self.e2e.observe(seconds)
        if self._ray:
            self._ray["requests"].inc(1, {"endpoint": endpoint, "status": str(status)})
            if gen_tokens:
                self._ray["tokens"].inc(gen_tokens)

    def route(self, name: str) -> None:
        self.routes.labels(name).inc()

    def render(self, engine_samples: list[dict[str, Any]]) -> bytes:
        self.engine.samples = engine_samples
        return generate_latest(self.registry)


def _ray_metrics() -> dict[str, Any] | None:
    """`ray.serve.metrics` twins (exported by Ray's metrics agent, tagged with deployment and replica); None outside
    a Serve replica."""
    try:
        from ray.serve import metrics as sm

        out = {
            "ttft": sm.Histogram("ernie_serve_ttft_seconds", "time to first token", boundaries=list(TTFT_BUCKETS)),
            "itl": sm.Histogram("ernie_serve_itl_seconds", "inter-token latency", boundaries=list(ITL_BUCKETS)),
            "requests": sm.Counter("ernie_serve_requests", "HTTP requests", tag_keys=("endpoint", "status")),
            "tokens": sm.Counter("ernie_serve_generation_tokens", "generated tokens"),
        }
        return out
    except Exception as e:  # metrics must never take the server down
        log.info("ray.serve.metrics unavailable (%s); /metrics only", e)
        return None


def engine_gauges() -> dict[str, Any] | None:
    """`ray.serve.metrics` gauges an engine replica sets from its `Engine.stats()`."""
    try:
        from ray.serve import metrics as sm

        return {k: sm.Gauge(f"ernie_serve_engine_{k}", f"Engine.stats()['{k}']") for k in ENGINE_KEYS}
    except Exception as e:
        log.info("ray.serve.metrics unavailable (%s)", e)
        return None
