"""Frontend and router metrics (``strata_`` prefix). Labels are bounded: no request ids."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM latencies: TTFT from 10 ms to 60 s, ITL from 1 ms to 1 s.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class FrontendMetrics:
    """The frontend's registry. Every series carries ``model`` (the served model name)."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model  # the first served model, if known (created at 0 below)
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "strata_frontend_requests",
            "Requests answered by the frontend, by endpoint and HTTP status.",
            ("model", "endpoint", "status"),
            registry=r,
        )
        self.active_requests = Gauge(
            "strata_frontend_active_requests", "Requests in flight.", ("model",), registry=r
        )
        self.ttft = Histogram(
            "strata_frontend_time_to_first_token_seconds",
            "Time from request arrival to the first token sent to the client.",
            ("model",),
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "strata_frontend_inter_token_latency_seconds",
            "Time between tokens sent to the client.",
            ("model",),
            buckets=ITL_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "strata_frontend_request_duration_seconds",
            "Request duration, arrival to last token.",
            ("model",),
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "strata_frontend_prompt_tokens", "Prompt tokens.", ("model",), registry=r
        )
        self.cached_prompt_tokens = Counter(
            "strata_frontend_cached_prompt_tokens",
            "Prompt tokens the chosen worker found in its prefix cache (worker-reported).",
            ("model",),
            registry=r,
        )
        self.output_tokens = Counter(
            "strata_frontend_output_tokens", "Output tokens sent.", ("model",), registry=r
        )
        self.migrations = Counter(
            "strata_frontend_migrations",
            "Requests re-sent to another worker after a worker failed mid-request.",
            ("model",),
            registry=r,
        )
        self.disagg_decisions = Counter(
            "strata_router_disagg_decisions",
            "Where prompts were prefilled: remote (a prefill worker, KV pulled by the decode "
            "worker), local_short, local_no_prefill_worker, local_prefill_failed, aggregated.",
            ("model", "decision"),
            registry=r,
        )
        self.remote_prefill_seconds = Histogram(
            "strata_frontend_remote_prefill_seconds",
            "Time of the prefill worker's max_tokens=1 request in disaggregated serving.",
            ("model",),
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.decisions = Counter(
            "strata_router_decisions",
            "Routing decisions by policy, reason and chosen worker.",
            ("model", "policy", "reason", "worker"),
            registry=r,
        )
        self.predicted_cached_tokens = Counter(
            "strata_router_predicted_cached_tokens",
            "Prompt tokens the router expected the chosen worker to have cached.",
            ("model", "policy"),
            registry=r,
        )
        self.worker_active_requests = Gauge(
            "strata_router_worker_active_requests",
            "Requests the router has in flight per worker.",
            ("model", "worker"),
            registry=r,
        )
        self.worker_decode_blocks = Gauge(
            "strata_router_worker_active_decode_blocks",
            "KV blocks of requests in flight per worker (router's own count).",
            ("model", "worker"),
            registry=r,
        )
        self.worker_prefill_tokens = Gauge(
            "strata_router_worker_active_prefill_tokens",
            "Uncached prompt tokens waiting for their first token per worker.",
            ("model", "worker"),
            registry=r,
        )
        self.workers = Gauge(
            "strata_router_workers", "Registered workers by health.", ("model", "state"), registry=r
        )
        self.kv_event_batches = Counter(
            "strata_router_kv_event_batches",
            "KV event batches applied to the index, per worker.",
            ("model", "worker"),
            registry=r,
        )
        self.kv_events = Counter(
            "strata_router_kv_events",
            "KV events applied to the index, by type.",
            ("model", "type"),
            registry=r,
        )
        self.kv_event_gaps = Counter(
            "strata_router_kv_event_lost_batches",
            "KV event batches lost (sequence gaps the replay could not fill).",
            ("model", "worker"),
            registry=r,
        )
        self.indexed_blocks = Gauge(
            "strata_router_indexed_blocks",
            "Blocks in the router's KV index (all versions of the model).",
            ("model",),
            registry=r,
        )
        self.workers_without_events = Gauge(
            "strata_router_workers_without_kv_events",
            "Workers that served requests but published no KV events (kv routing is blind).",
            ("model",),
            registry=r,
        )
        self._add_admission_metrics(r)
        if model is not None:
            self.add_model(model)

    def _add_admission_metrics(self, r: CollectorRegistry) -> None:
        self.rejected = Counter(
            "strata_frontend_rejected_requests",
            "Requests refused at admission: 429 (inflight_limit, queued_tokens_limit, "
            "key_requests_per_minute, key_tokens_per_minute) or 413 (request_too_large).",
            ("model", "reason"),
            registry=r,
        )
        self.rejection_seconds = Histogram(
            "strata_frontend_rejection_seconds",
            "Time from a request's arrival at the frontend to its 429 (admission refused).",
            ("model",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.queued_prompt_tokens = Gauge(
            "strata_frontend_queued_prompt_tokens",
            "Prompt tokens of admitted requests that have no first token yet.",
            ("model",),
            registry=r,
        )
        self.admission_limit = Gauge(
            "strata_frontend_admission_limit",
            "Admission limits per model (0: none): inflight_requests, queued_prompt_tokens.",
            ("model", "limit"),
            registry=r,
        )
        self.key_requests = Counter(
            "strata_frontend_key_requests",
            "Requests of rate-limited API keys (by key name): admitted or rejected.",
            ("model", "key", "outcome"),
            registry=r,
        )
        self.key_tokens = Counter(
            "strata_frontend_key_tokens",
            "Tokens (prompt + output) used by rate-limited API keys.",
            ("model", "key"),
            registry=r,
        )
        self.auth_failures = Counter(
            "strata_frontend_auth_failures",
            "Requests refused for their key: unauthorized (401) or forbidden (403).",
            ("reason",),
            registry=r,
        )
        self.api_keys = Gauge(
            "strata_frontend_api_keys", "API keys configured, by role.", ("role",), registry=r
        )
        self.keys_reloads = Counter(
            "strata_frontend_keys_reloads",
            "Keys file reloads: ok, or error (the keys in use are kept).",
            ("outcome",),
            registry=r,
        )
        for reason in ("unauthorized", "forbidden"):
            self.auth_failures.labels(reason=reason)
        for outcome in ("ok", "error"):
            self.keys_reloads.labels(outcome=outcome)
        self.rejected.labels(model="", reason="request_too_large")

    def add_model(self, model: str) -> None:
        """Create the model's unlabelled-by-request series at 0, so rate() sees them from the
        first scrape."""
        for state in ("healthy", "unhealthy"):
            self.workers.labels(model=model, state=state)
        self.migrations.labels(model=model)
        for decision in ("remote", "local_short", "local_no_prefill_worker",
                         "local_prefill_failed", "aggregated"):  # fmt: skip
            self.disagg_decisions.labels(model=model, decision=decision)
        self.active_requests.labels(model=model)
        self.indexed_blocks.labels(model=model)
        self.workers_without_events.labels(model=model)
        for reason in ("inflight_limit", "queued_tokens_limit", "key_requests_per_minute",
                       "key_tokens_per_minute"):  # fmt: skip
            self.rejected.labels(model=model, reason=reason)
        self.queued_prompt_tokens.labels(model=model)
        self.rejection_seconds.labels(model=model)

    def forget_worker(self, model: str, worker_id: str) -> None:
        for gauge in (
            self.worker_active_requests,
            self.worker_decode_blocks,
            self.worker_prefill_tokens,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(model, worker_id)
