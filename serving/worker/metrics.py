"""Worker metrics with vLLM's names and labels (``model_name``, ``engine``).

One dashboard then serves Strata workers and stock ``vllm serve`` workers alike. Counters are
declared without ``_total``; prometheus-client appends it on exposition, as in vLLM.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engine.output_processor import RequestOutput
from serving.engine.outputs import SchedulerStats
from serving.worker.kv_connector import PullResult

_LABELS = ("model_name", "engine")

# Buckets as in vLLM's loggers.py (seconds / tokens).
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TRANSFER_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class WorkerMetrics:
    """Owns a registry; ``record_step`` and ``record_finished`` are called by the engine loop."""

    def __init__(
        self,
        model_name: str,
        engine: str = "0",
        *,
        role: str = "both",
        transport: str = "none",
        transport_fallback: bool = False,
        efa: str = "off",
    ) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": engine}
        self.transport = transport
        # Registration order is exposition order: step metrics, request metrics, then Strata's.
        self._add_step_metrics()
        self._add_request_metrics()
        self._add_worker_info(role, transport_fallback, efa)
        self._add_kv_transfer_metrics()
        self._init_labelled_children()

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, _LABELS, registry=self.registry).labels(**self.labels)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, _LABELS, registry=self.registry).labels(**self.labels)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, _LABELS, buckets=buckets, registry=self.registry).labels(
            **self.labels
        )

    def _add_step_metrics(self) -> None:
        """The scheduler's per-step gauges and counters (``record_step``)."""
        gauge, counter = self._gauge, self._counter
        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.kv_cache_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")

    def _add_request_metrics(self) -> None:
        """Per-request outcomes, latencies, token counts (``record_token``, ``record_finished``)."""
        histogram = self._histogram
        self._request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*_LABELS, "finished_reason"),
            registry=self.registry,
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token.", TTFT_BUCKETS_S
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency.", ITL_BUCKETS_S
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            TOKEN_BUCKETS,
        )

    def _add_worker_info(self, role: str, transport_fallback: bool, efa: str) -> None:
        """Disaggregation (Strata's own names): the role and the KV transport, as a constant 1."""
        Gauge(
            "strata_worker_info",
            "Constant 1: this worker's role and KV transport (fallback=true: NIXL was unusable; "
            "efa: off | ok | fallback, the EFA check at start).",
            (*_LABELS, "role", "transport", "fallback", "efa"),
            registry=self.registry,
        ).labels(
            **self.labels,
            role=role,
            transport=self.transport,
            fallback=str(transport_fallback).lower(),
            efa=efa,
        ).set(1)

    def _add_kv_transfer_metrics(self) -> None:
        """KV traffic: bytes, pull times and outcomes, prefill leases (``record_kv_pull``)."""
        r, transport = self.registry, self.transport
        # One name for every KV byte movement: tier changes (offload/onboard, later) and
        # worker-to-worker pulls (direction "receive" into the device tier G1).
        self.transfer_bytes_family = Counter(
            "strata_kv_transfer_bytes",
            "KV bytes moved: pulled from prefill workers (direction=receive, tier=G1), and "
            "between KV tiers (transport=tier, direction=onboard|offload).",
            (*_LABELS, "transport", "tier", "direction"),
            registry=r,
        )
        self._transfer_bytes = self.transfer_bytes_family.labels(
            **self.labels, transport=transport, tier="G1", direction="receive"
        )
        self._transfer_seconds = Histogram(
            "strata_kv_transfer_seconds",
            "Time of one request's KV pull (connect, transfer, release notification).",
            (*_LABELS, "transport"),
            buckets=TRANSFER_BUCKETS_S,
            registry=r,
        ).labels(**self.labels, transport=transport)
        self._pulls = Counter(
            "strata_kv_pulls",
            "KV pulls by outcome (failed: the request was prefilled locally instead).",
            (*_LABELS, "transport", "outcome"),
            registry=r,
        )
        self._leases_released = Counter(
            "strata_kv_leases_released",
            "Prefill leases ended: pulled (decode confirmed), released (API) or expired.",
            (*_LABELS, "how"),
            registry=r,
        )
        self.kv_leases = self._gauge(
            "strata_kv_leases", "Finished prefill requests whose blocks wait for a decode pull."
        )

    def _init_labelled_children(self) -> None:
        """Create the labelled children so that every series exists from the first scrape."""
        for reason in ("stop", "length", "abort"):
            self._request_success.labels(**self.labels, finished_reason=reason)
        for outcome in ("ok", "failed"):
            self._pulls.labels(**self.labels, transport=self.transport, outcome=outcome)
        for how in ("pulled", "released", "expired"):
            self._leases_released.labels(**self.labels, how=how)

    def record_kv_pull(self, result: PullResult) -> None:
        outcome = "ok" if result.succeeded else "failed"
        self._pulls.labels(**self.labels, transport=self.transport, outcome=outcome).inc()
        if result.succeeded:
            self._transfer_bytes.inc(result.num_bytes)
            self._transfer_seconds.observe(result.duration_s)

    def record_lease_released(self, how: str) -> None:
        self._leases_released.labels(**self.labels, how=how).inc()

    def record_step(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.num_preemptions.inc(stats.num_preemptions)

    def record_token(self, output: RequestOutput, prev_token_s: float | None) -> None:
        """Per-output latency: TTFT on the first token, ITL after."""
        times = output.times
        if times is None or times.last_token_s is None:
            return
        if prev_token_s is None and times.first_token_s is not None:
            self.ttft.observe(times.first_token_s - times.arrival_s)
        elif prev_token_s is not None:
            self.itl.observe(times.last_token_s - prev_token_s)

    def record_aborted(self) -> None:
        """A request the client abandoned (disconnect): it ends with no final output."""
        self._request_success.labels(**self.labels, finished_reason="abort").inc()

    def record_finished(self, output: RequestOutput, now_s: float) -> None:
        reason = output.finish_reason or "abort"
        self._request_success.labels(**self.labels, finished_reason=reason).inc()
        self.request_prompt_tokens.observe(output.num_prompt_tokens)
        self.request_generation_tokens.observe(output.num_output_tokens)
        times = output.times
        if times is None:
            return
        self.e2e.observe(now_s - times.arrival_s)
        if times.first_scheduled_s is not None:
            self.queue_time.observe(times.first_scheduled_s - times.arrival_s)
            if times.first_token_s is not None:
                self.prefill_time.observe(times.first_token_s - times.first_scheduled_s)
                self.decode_time.observe(now_s - times.first_token_s)
