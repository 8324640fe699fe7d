"""Prometheus metrics under vLLM's names and buckets, so its Grafana dashboards and AIPerf work unchanged.

Request metrics carry the served model's name as `model_name`. Engine-wide state (scheduler queues, the KV
pool) is read at scrape time from the engine's published snapshot; the running and waiting gauges are
split by served model, while KV usage, prefix-cache and preemption figures belong to the one shared engine
and carry the first served model's name. `longserve:` metrics add what vLLM has no name for: the attention
backend of each request, admission rejections, client aborts, queued prefill tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.async_engine import AsyncEngine
from server.admission import Admission

disable_created_metrics()  # as vLLM: the `_created` series only double what dashboards scrape

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> list[int]:
    """vLLM's 1-2-5 series, capped at the model's length."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(m * scale)
        scale *= 10


class EngineCollector:
    """Scrape-time figures from the engine's snapshot and the admission state."""

    def __init__(self, engine: AsyncEngine, admission: Admission, model_of: Callable[[str], str | None],
                 model_names: list[str]) -> None:
        self.engine, self.admission, self.model_of, self.model_names = engine, admission, model_of, model_names

    def _per_model(self, name: str, doc: str, request_ids: Iterable[str]) -> GaugeMetricFamily:
        counts = dict.fromkeys(self.model_names, 0)
        for rid in request_ids:
            model = self.model_of(rid)
            if model in counts:
                counts[model] += 1
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        for model, n in counts.items():
            family.add_metric([model], n)
        return family

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.stats
        main = [self.model_names[0]]
        yield self._per_model("vllm:num_requests_running", "Requests in the running batch.", stats.running)
        yield self._per_model("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.waiting)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1.", labels=["model_name"])
        usage.add_metric(main, stats.usage.usage)
        yield usage
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.usage.prefix_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.usage.prefix_hits),
            ("vllm:num_preemptions", "Preemptions (recompute) by the scheduler.", stats.num_preemptions),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(main, value)
            yield family
        queued = GaugeMetricFamily("longserve:queued_prefill_tokens", "Prompt tokens admitted, not yet prefilled.",
                                   labels=["model_name"])
        queued.add_metric(main, self.admission.queued_tokens)
        yield queued
        rejected = CounterMetricFamily("longserve:admission_rejections", "Requests refused by admission control.",
                                       labels=["model_name", "reason"])
        for reason, n in self.admission.rejections.items():
            rejected.add_metric([main[0], reason], n)
        yield rejected


class ServerMetrics:
    def __init__(self, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        tokens = token_buckets(max_model_len)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests.", [*m, "finished_reason"],
                                       registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", m, registry=r,
                              buckets=TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", m, registry=r,
                             buckets=ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", m,
                             registry=r, buckets=REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", m,
                                               registry=r, buckets=tokens)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Output tokens per request.",
                                                   m, registry=r, buckets=tokens)
        self.backend_requests = Counter("longserve:requests", "Finished requests by attention backend.",
                                        [*m, "attention_backend", "finished_reason"], registry=r)
        self.backend_ttft = Histogram("longserve:time_to_first_token_seconds", "Time to first token by backend.",
                                      [*m, "attention_backend"], registry=r, buckets=TTFT_BUCKETS)
        self.aborted = Counter("longserve:request_aborted", "Requests aborted before they finished.",
                               [*m, "reason"], registry=r)

    def track(self, model_name: str, backend: str, prompt_len: int, arrival: float) -> RequestTrack:
        return RequestTrack(self, model_name, backend, prompt_len, arrival)


@dataclass
class RequestTrack:
    """One sequence's timeline, turned into observations as its outputs arrive."""

    metrics: ServerMetrics
    model_name: str
    backend: str
    prompt_len: int
    arrival: float
    last: float | None = None
    output_tokens: int = 0
    done: bool = field(default=False)

    def on_output(self, new_tokens: int) -> None:
        now, m, model = time.monotonic(), self.metrics, self.model_name
        if self.last is None:
            m.ttft.labels(model).observe(now - self.arrival)
            m.backend_ttft.labels(model, self.backend).observe(now - self.arrival)
            m.prompt_tokens.labels(model).inc(self.prompt_len)
        else:
            m.itl.labels(model).observe(now - self.last)
        self.last = now
        self.output_tokens += new_tokens
        m.generation_tokens.labels(model).inc(new_tokens)

    def on_finish(self, reason: str, abort_reason: str = "client_disconnect") -> None:
        if self.done:
            return
        self.done = True
        m, model = self.metrics, self.model_name
        m.request_success.labels(model, reason).inc()
        m.backend_requests.labels(model, self.backend, reason).inc()
        if reason == "abort":
            m.aborted.labels(model, abort_reason).inc()
            return
        m.e2e.labels(model).observe(time.monotonic() - self.arrival)
        m.request_prompt_tokens.labels(model).observe(self.prompt_len)
        m.request_generation_tokens.labels(model).observe(self.output_tokens)
