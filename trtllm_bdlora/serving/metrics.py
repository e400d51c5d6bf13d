"""Prometheus metrics on `--metrics-port` (8002), with Triton's names (docs/user_guide/metrics.md of Triton)
and the TensorRT-LLM backend's (inflight_batcher_llm/src/custom_metrics_reporter), plus ours.

Triton, per model and version: nv_inference_request_success, nv_inference_request_failure{reason},
nv_inference_count, nv_inference_exec_count (counters), nv_inference_pending_request_count (gauge), the
cumulative microsecond counters nv_inference_request_duration_us, nv_inference_queue_duration_us,
nv_inference_compute_input_duration_us, nv_inference_compute_infer_duration_us,
nv_inference_compute_output_duration_us, and nv_inference_first_response_histogram_ms.
TensorRT-LLM backend (model tensorrt_llm): nv_trt_llm_request_metrics{request_type}, nv_trt_llm_inflight_batcher_
metrics{inflight_batcher_specific_metric}, nv_trt_llm_general_metrics{general_type}, nv_llm_input_token_len /
nv_llm_output_token_len histograms. Its KV-cache and memory families do not apply (no paged cache, no GPU);
it has no LoRA family. Ours: trtllm_bdlora_adapters_registered, trtllm_bdlora_adapter_slots{state},
trtllm_bdlora_adapter_slot_evictions (counter), trtllm_bdlora_lora_collectives_per_step (last step),
trtllm_bdlora_prefix_cache_queries / _hits (counters of prompt tokens, as vLLM's prefix_cache_queries / _hits).

Triton's and the backend's series keep their names and label sets, so Triton dashboards read them unchanged; they
count every request whatever its protocol (an OpenAI request is a `tensorrt_llm` request). The protocol a client
used (`protocol` = kserve_grpc | kserve_http | openai) is on our own series, named as Prometheus names them:
trtllm_bdlora_requests_total{protocol,outcome}, and the histograms trtllm_bdlora_request_duration_seconds,
trtllm_bdlora_time_to_first_response_seconds (per client request), trtllm_bdlora_prompt_tokens,
trtllm_bdlora_generation_tokens (per executor request, as nv_llm_*_token_len) {protocol}. docs/metrics.md.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

TOKEN_BUCKETS = (10.0, 50.0, 100.0, 500.0, 1000.0)  # the backend's token-length buckets
FIRST_RESPONSE_BUCKETS_MS = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 60000)
PROTOCOLS = ("kserve_grpc", "kserve_http", "openai")
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")  # nv_inference_request_failure{reason}, as Triton's
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds (includes cached "
                                        "requests)",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds (includes cached "
                                      "requests)",
    "nv_inference_compute_input_duration_us": "Cumulative compute input duration in microseconds (does not include "
                                              "cached requests)",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds (does not "
                                              "include cached requests)",
    "nv_inference_compute_output_duration_us": "Cumulative inference compute output duration in microseconds (does "
                                               "not include cached requests)",
}


class _Record:
    """One model request being counted."""

    def __init__(self, metrics: Metrics, model: str, batch: int):
        self.metrics, self.model, self.batch = metrics, model, batch
        self.start = time.perf_counter_ns()
        self.first: int | None = None
        self.done = False

    def responded(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()
            self.metrics.first_response.labels(self.model, "1").observe((self.first - self.start) / 1e6)

    def finish(self, failure: str | None, queued_ns: int = 0) -> None:
        """Counted once (the first call), from whichever thread ends it."""
        with self.metrics._lock:
            if self.done:
                return
            self.done = True
        self.metrics.finish(self, failure, time.perf_counter_ns() - self.start, queued_ns)


class ClientCall:
    """One client request on one protocol (a KServe call, a request on a stream, an OpenAI request), from its
    arrival to its last response: counted once, as a success or a failure (the first `finish` wins). Used as a
    context manager, an exception that leaves the block finishes it as a failure."""

    def __init__(self, metrics: Metrics, protocol: str):
        self.metrics, self.protocol = metrics, protocol
        self.start = time.perf_counter_ns()
        self.first: int | None = None
        self.done = False

    def responded(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()
            self.metrics.time_to_first_response.labels(self.protocol).observe((self.first - self.start) / 1e9)

    def finish(self, ok: bool) -> None:
        with self.metrics._lock:
            if self.done:
                return
            self.done = True
        self.metrics.client_finished(self, ok, time.perf_counter_ns() - self.start)

    def __enter__(self) -> ClientCall:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.finish(ok=False)


class Metrics:
    def __init__(self):
        disable_created_metrics()  # Triton exports no `_created` series
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._counts: dict[tuple, float] = defaultdict(float)  # (name, model, extra label) -> value
        self._pending: dict[str, int] = defaultdict(int)
        self._last_ms: dict[str, int] = defaultdict(int)
        self.runtime = None
        self.first_response = Histogram("nv_inference_first_response_histogram_ms",
                                        "Duration from request to first response in milliseconds",
                                        ["model", "version"], buckets=FIRST_RESPONSE_BUCKETS_MS, registry=self.registry)
        self.input_tokens = Histogram("nv_llm_input_token_len", "TRT LLM response metrics",
                                      ["model", "version", "response_metric_type"], buckets=TOKEN_BUCKETS,
                                      registry=self.registry)
        self.output_tokens = Histogram("nv_llm_output_token_len", "TRT LLM response metrics",
                                       ["model", "version", "response_metric_type"], buckets=TOKEN_BUCKETS,
                                       registry=self.registry)
        self.request_duration = Histogram("trtllm_bdlora_request_duration_seconds",
                                          "Client request duration, arrival to last response, per protocol",
                                          ["protocol"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.time_to_first_response = Histogram("trtllm_bdlora_time_to_first_response_seconds",
                                                "Client request arrival to its first response (first token when "
                                                "streamed), per protocol", ["protocol"], buckets=LATENCY_BUCKETS_S,
                                                registry=self.registry)
        self.prompt_tokens = Histogram("trtllm_bdlora_prompt_tokens", "Prompt tokens per executor request, per protocol",
                                       ["protocol"], buckets=TOKEN_COUNT_BUCKETS, registry=self.registry)
        self.generation_tokens = Histogram("trtllm_bdlora_generation_tokens",
                                           "Generated tokens per executor request, per protocol", ["protocol"],
                                           buckets=TOKEN_COUNT_BUCKETS, registry=self.registry)
        self._calls: dict[tuple[str, str], int] = {(p, o): 0 for p in PROTOCOLS for o in ("success", "failure")}
        for protocol in PROTOCOLS:  # every protocol's series exported from the start, at zero
            for histogram in (self.request_duration, self.time_to_first_response, self.prompt_tokens,
                              self.generation_tokens):
                histogram.labels(protocol)
        self.registry.register(_Collector(self))

    def declare(self, models) -> None:
        """Export every model's series from the start, at zero, as Triton does once a model is loaded."""
        with self._lock:
            for model in models:
                for name in COUNTERS:
                    for extra in ([(("reason", r),) for r in FAILURE_REASONS] if name.endswith("_failure") else [()]):
                        self._counts[(name, model, extra)] += 0
                self._pending[model] += 0

    def watch(self, runtime) -> None:
        """Report the runtime's batcher and adapter state (read when scraped)."""
        self.runtime = runtime

    def _add(self, name: str, model: str, value: float, extra: tuple = ()) -> None:
        with self._lock:
            self._counts[(name, model, extra)] += value

    def start(self, model: str, batch: int) -> _Record:
        with self._lock:
            self._pending[model] += 1
        return _Record(self, model, batch)

    def finish(self, record: _Record, failure: str | None, duration_ns: int, queued_ns: int) -> None:
        """A request done: counted as success or failure; its time split into queue (the runtime's queue, for
        the core model and the models that call it) and compute."""
        with self._lock:
            self._pending[record.model] -= 1
        if failure:
            self.failed(record.model, failure)
            return
        queued_ns = min(queued_ns, duration_ns)
        self._last_ms[record.model] = int(time.time() * 1000)
        self._add("nv_inference_request_success", record.model, 1)
        self._add("nv_inference_count", record.model, record.batch)
        self._add("nv_inference_exec_count", record.model, 1)
        self._add("nv_inference_request_duration_us", record.model, duration_ns / 1000)
        self._add("nv_inference_queue_duration_us", record.model, queued_ns / 1000)
        self._add("nv_inference_compute_infer_duration_us", record.model, (duration_ns - queued_ns) / 1000)

    def failed(self, model: str, reason: str) -> None:
        self._add("nv_inference_request_failure", model, 1, (("reason", reason),))

    def input_time(self, model: str, ns: int) -> None:
        self._add("nv_inference_compute_input_duration_us", model, ns / 1000)

    def output_time(self, model: str, ns: int) -> None:
        self._add("nv_inference_compute_output_duration_us", model, ns / 1000)

    def tokens(self, model: str, prompt_tokens: int, output_tokens: int, protocol: str | None = None) -> None:
        """A finished core-model sequence's token counts (and its client's protocol, when it has one)."""
        self.input_tokens.labels(model, "1", "total_input_tokens").observe(prompt_tokens)
        self.output_tokens.labels(model, "1", "total_output_tokens").observe(output_tokens)
        if protocol is not None:
            self.prompt_tokens.labels(protocol).observe(prompt_tokens)
            self.generation_tokens.labels(protocol).observe(output_tokens)

    def call(self, protocol: str) -> ClientCall:
        """A client request arriving on `protocol` (one of PROTOCOLS)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        return ClientCall(self, protocol)

    def client_finished(self, call: ClientCall, ok: bool, duration_ns: int) -> None:
        with self._lock:
            self._calls[(call.protocol, "success" if ok else "failure")] += 1
        self.request_duration.labels(call.protocol).observe(duration_ns / 1e9)

    def statistics(self, model: str) -> dict:
        """The model's KServe statistics: counts, and (count, nanoseconds) per stage."""
        with self._lock:
            c = {name: value for (name, m, _), value in self._counts.items() if m == model}
            failures = sum(v for (name, m, _), v in self._counts.items() if m == model and name.endswith("failure"))
        success = int(c.get("nv_inference_request_success", 0))

        def ns(name):
            return success, int(c.get(f"nv_inference_{name}_duration_us", 0) * 1000)

        return {"last_inference": self._last_ms.get(model, 0), "inference_count": int(c.get("nv_inference_count", 0)),
                "execution_count": int(c.get("nv_inference_exec_count", 0)), "success": ns("request"),
                "fail": (int(failures), 0), "queue": ns("queue"), "compute_input": ns("compute_input"),
                "compute_infer": ns("compute_infer"), "compute_output": ns("compute_output")}

    def exposition(self) -> bytes:
        """The text format, with counter families named as Triton names them (no `_total` suffix)."""
        text = generate_latest(self.registry).decode()
        for name in COUNTERS:
            text = text.replace(f"# HELP {name}_total ", f"# HELP {name} ").replace(f"# TYPE {name}_total ",
                                                                                     f"# TYPE {name} ")
        return text.encode()


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        with m._lock:
            counts = dict(m._counts)
            pending = dict(m._pending)
        families = {name: Metric(name, doc, "counter") for name, doc in COUNTERS.items()}
        for (name, model, extra), value in counts.items():
            if name in families:
                families[name].add_sample(name, {"model": model, "version": "1", **dict(extra)}, value)
        yield from families.values()
        gauge = GaugeMetricFamily("nv_inference_pending_request_count",
                                  "Instantaneous number of pending requests awaiting execution per-model.",
                                  labels=["model", "version"])
        for model, value in pending.items():
            gauge.add_metric([model, "1"], value)
        yield gauge
        with m._lock:
            calls = dict(m._calls)
        requests = Metric("trtllm_bdlora_requests", "Client requests by protocol and outcome", "counter")
        for (protocol, outcome), value in calls.items():
            requests.add_sample("trtllm_bdlora_requests_total", {"protocol": protocol, "outcome": outcome}, value)
        yield requests
        if m.runtime is not None:
            yield from _runtime_families(m.runtime)


def _family(name: str, doc: str, label: str, values: dict[str, float], model: str = "tensorrt_llm"):
    family = GaugeMetricFamily(name, doc, labels=["model", "version", label])
    for key, value in values.items():
        family.add_metric([model, "1", key], value)
    return family


def _runtime_families(runtime):
    scheduler, pool = runtime.scheduler, runtime.engine.pool
    st = scheduler.stats
    yield _family("nv_trt_llm_request_metrics", "TRT LLM request metrics", "request_type",
                  {"active": runtime.active, "max": scheduler.max_batch_size, "scheduled": len(scheduler.running),
                   "context": st.context_requests, "waiting": runtime.queued})
    yield _family("nv_trt_llm_inflight_batcher_metrics", "TRT LLM inflight_batcher-specific metrics",
                  "inflight_batcher_specific_metric",
                  {"total_context_tokens": st.context_tokens, "generation_requests": st.generation_requests,
                   "micro_batch_id": 0, "paused_requests": 0})
    yield _family("nv_trt_llm_general_metrics", "General TRT LLM metrics", "general_type",
                  {"iteration_counter": st.iterations, "timestamp": int(time.time() * 1e6)})
    yield GaugeMetricFamily("trtllm_bdlora_adapters_registered", "Adapters registered (host cache)",
                            value=len(pool.host))
    slots = GaugeMetricFamily("trtllm_bdlora_adapter_slots", "Device adapter slots per rank", labels=["state"])
    slots.add_metric(["used"], len(pool.slot_of))
    slots.add_metric(["total"], pool.max_loras)
    yield slots
    evictions = Metric("trtllm_bdlora_adapter_slot_evictions", "Adapters evicted from a device slot", "counter")
    evictions.add_sample("trtllm_bdlora_adapter_slot_evictions_total", {}, st.slot_evictions)
    yield evictions
    for name, doc, value in (("queries", "Prompt tokens looked up in the KV caches of running and kept sequences",
                              st.prefix_query_tokens),
                             ("hits", "Prompt tokens copied from another sequence's KV cache, not computed",
                              st.prefix_hit_tokens)):
        counter = Metric(f"trtllm_bdlora_prefix_cache_{name}", doc, "counter")
        counter.add_sample(f"trtllm_bdlora_prefix_cache_{name}_total", {}, value)
        yield counter
    yield GaugeMetricFamily("trtllm_bdlora_lora_collectives_per_step",
                            "LoRA collectives issued in the last engine step (0 with bdlora)", value=st.lora_collectives)
