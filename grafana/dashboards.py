"""Strata's Grafana dashboards, the one source of truth: ``python -m grafana.generate`` writes them.

Worker panels use vLLM's metric names (``vllm:*``, label ``model_name``), so they serve Strata
workers and stock ``vllm serve`` workers alike; frontend and router panels use ``strata_*``
(label ``model``). The workers' own disaggregation metrics (``strata_worker_info``,
``strata_kv_*``) carry ``model_name`` too. Per-worker breakdowns of worker metrics use the
scrape target (``instance``).
Panels on metrics no component emits yet would define them in ``grafana.planned_metrics``
(empty now: the KV tiers' metrics, the last planned ones, are the workers').
"""

from __future__ import annotations

from grafana.panels import CellColor, Dashboard, Panel, Query, Row
from grafana.promql import (
    MODEL,
    MODEL_NAME,
    RATE,
    per_worker_or_zero,
    quantiles,
    rate,
    slo_attainment_queries,
)


def _serving() -> Dashboard:
    fe = "strata_frontend"
    requests = f"{fe}_requests_total"
    errors = MODEL + ', status!~"2.."'
    return Dashboard(
        uid="strata-serving",
        title="Strata / Serving",
        description="The OpenAI endpoint as clients see it (frontend) and the workers' queues.",
        model_values=f"label_values({requests}, model)",
        panels=(
            Panel(
                "Request rate",
                (
                    Query(
                        f"sum by (endpoint, status) ({rate(requests, MODEL)})",
                        "{{endpoint}} {{status}}",
                    ),
                ),
                unit="reqps",
                description="Requests answered, by endpoint and HTTP status.",
            ),
            Panel(
                "Errors by status code",
                (Query(f"sum by (status) ({rate(requests, errors)})", "{{status}}"),),
                unit="reqps",
                description="Non-2xx answers: 4xx are the client's, 5xx ours.",
            ),
            Panel(
                "Time to first token",
                quantiles(f"{fe}_time_to_first_token_seconds_bucket", MODEL),
                unit="s",
                description="Arrival at the frontend to the first token sent to the client.",
            ),
            Panel(
                "Inter-token latency",
                quantiles(f"{fe}_inter_token_latency_seconds_bucket", MODEL),
                unit="s",
                description="Time between tokens sent to the client.",
            ),
            Panel(
                "End-to-end request latency",
                quantiles(f"{fe}_request_duration_seconds_bucket", MODEL),
                unit="s",
                description="Arrival to the last token.",
            ),
            Panel(
                "Tokens per second",
                (
                    Query(f"sum({rate(f'{fe}_prompt_tokens_total', MODEL)})", "prompt (in)"),
                    Query(f"sum({rate(f'{fe}_output_tokens_total', MODEL)})", "output (out)"),
                ),
                unit="suffix: tok/s",
            ),
            Panel(
                "Running and waiting requests",
                (
                    Query(f"sum(vllm:num_requests_running{{{MODEL_NAME}}})", "running (workers)"),
                    Query(f"sum(vllm:num_requests_waiting{{{MODEL_NAME}}})", "waiting (workers)"),
                    Query(f"sum({fe}_active_requests{{{MODEL}}})", "in flight (frontend)"),
                ),
                description="Workers' batch and queue; the frontend's requests in flight.",
            ),
            Panel(
                "Migrations",
                (Query(f"sum({rate(f'{fe}_migrations_total', MODEL)})", "migrations"),),
                unit="reqps",
                description="Requests re-sent to another worker after one failed mid-stream.",
            ),
            Panel(
                "SLO attainment",
                slo_attainment_queries(),
                unit="percentunit",
                width=24,
                description="Share of requests within the SLO thresholds (target 99%).",
            ),
            *_admission_panels(fe),
        ),
    )


def _admission_panels(fe: str) -> tuple[Panel | Row, ...]:
    """The frontend's admission control and API keys (Serving dashboard)."""
    limit = f"{fe}_admission_limit"
    return (
        Row("Admission and API keys"),
        Panel(
            "Refused requests by reason",
            (
                Query(
                    f"sum by (reason) ({rate(f'{fe}_rejected_requests_total', MODEL)})",
                    "{{reason}}",
                ),
            ),
            unit="reqps",
            stack=True,
            width=8,
            description="429 with Retry-After: inflight_limit, queued_tokens_limit (the "
            "model's), key_requests_per_minute, key_tokens_per_minute (the API key's); 413: "
            "request_too_large.",
        ),
        Panel(
            "Requests in flight vs limit",
            (
                Query(f"sum({fe}_active_requests{{{MODEL}}})", "in flight"),
                Query(f'sum({limit}{{{MODEL}, limit="inflight_requests"}}) > 0', "limit"),
            ),
            width=8,
            description="Per model, beyond the limit new requests get 429 at once.",
        ),
        Panel(
            "Queued prompt tokens vs limit",
            (
                Query(f"sum({fe}_queued_prompt_tokens{{{MODEL}}})", "queued"),
                Query(f'sum({limit}{{{MODEL}, limit="queued_prompt_tokens"}}) > 0', "limit"),
            ),
            width=8,
            description="Prompt tokens of admitted requests still waiting for a first token.",
        ),
        Panel(
            "Time to 429",
            quantiles(f"{fe}_rejection_seconds_bucket", MODEL, qs=(0.5, 0.99)),
            unit="s",
            width=8,
            description="Arrival at the frontend to its 429 answer (target: under 50 ms).",
        ),
        Panel(
            "Requests per API key",
            (
                Query(
                    f"sum by (key, outcome) ({rate(f'{fe}_key_requests_total', MODEL)})",
                    "{{key}} {{outcome}}",
                ),
            ),
            unit="reqps",
            width=8,
            description="Keys with rate limits (keys file): admitted and rejected.",
        ),
        Panel(
            "Tokens per API key",
            (Query(f"sum by (key) ({rate(f'{fe}_key_tokens_total', MODEL)})", "{{key}}"),),
            unit="suffix: tok/s",
            width=8,
            description="Prompt plus output tokens used by rate-limited keys.",
        ),
    )


def _router() -> Dashboard:
    r = "strata_router"
    decisions = f"{r}_decisions_total"
    per_worker_rate = f"sum by (worker) ({rate(decisions, MODEL)})"
    every_worker_rate = per_worker_or_zero(
        rate(decisions, MODEL), f"{r}_worker_active_requests{{{MODEL}}}"
    )
    prompt_rate = f"sum({rate('strata_frontend_prompt_tokens_total', MODEL)})"
    return Dashboard(
        uid="strata-router",
        title="Strata / Router",
        description="Routing decisions, KV-cache hit rate, per-worker load, the KV event feed "
        "and where prompts are prefilled (disaggregation).",
        model_values="label_values(strata_frontend_requests_total, model)",
        panels=(
            Panel(
                "Decisions by policy and reason",
                (
                    Query(
                        f"sum by (policy, reason) ({rate(decisions, MODEL)})",
                        "{{policy}} {{reason}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Decisions per worker",
                (Query(per_worker_rate, "{{worker}}"),),
                unit="ops",
                stack=True,
            ),
            Panel(
                "KV hit rate (cached / prompt tokens)",
                (
                    Query(
                        f"sum({rate('strata_frontend_cached_prompt_tokens_total', MODEL)})"
                        f" / {prompt_rate}",
                        "cached (worker-reported)",
                    ),
                    Query(
                        f"sum({rate(f'{r}_predicted_cached_tokens_total', MODEL)}) / {prompt_rate}",
                        "predicted by the router",
                    ),
                ),
                unit="percentunit",
                description="Prompt tokens found in the chosen worker's prefix cache.",
            ),
            Panel(
                "Load imbalance (max / mean decision rate)",
                (Query(f"max({every_worker_rate}) / avg({every_worker_rate})", "max / mean"),),
                description="1 is an even spread; N means one of N workers takes everything. "
                "Workers the router tracks but sends nothing count as 0.",
            ),
            Panel(
                "Active requests per worker",
                (Query(f"sum by (worker) ({r}_worker_active_requests{{{MODEL}}})", "{{worker}}"),),
                width=8,
            ),
            Panel(
                "Active decode blocks per worker",
                (
                    Query(
                        f"sum by (worker) ({r}_worker_active_decode_blocks{{{MODEL}}})",
                        "{{worker}}",
                    ),
                ),
                width=8,
                description="KV blocks of requests in flight (router's own count).",
            ),
            Panel(
                "Active prefill tokens per worker",
                (
                    Query(
                        f"sum by (worker) ({r}_worker_active_prefill_tokens{{{MODEL}}})",
                        "{{worker}}",
                    ),
                ),
                width=8,
                description="Uncached prompt tokens waiting for their first token.",
            ),
            Panel(
                "KV events applied by type",
                (Query(f"sum by (type) ({rate(f'{r}_kv_events_total', MODEL)})", "{{type}}"),),
                unit="ops",
                width=8,
            ),
            Panel(
                "KV event batches per worker",
                (
                    Query(
                        f"sum by (worker) ({rate(f'{r}_kv_event_batches_total', MODEL)})",
                        "{{worker}}",
                    ),
                ),
                unit="ops",
                width=8,
            ),
            Panel(
                "Lost KV event batches per worker",
                (
                    Query(
                        per_worker_or_zero(
                            f"increase({r}_kv_event_lost_batches_total{{{MODEL}}}[{RATE}])",
                            f"{r}_kv_event_batches_total{{{MODEL}}}",
                        ),
                        "{{worker}}",
                    ),
                ),
                width=8,
                description="Sequence gaps the replay could not fill.",
            ),
            Panel(
                "Workers without KV events",
                (Query(f"sum({r}_workers_without_kv_events{{{MODEL}}})", "workers"),),
                kind="stat",
                width=8,
                description="Workers that serve requests but publish no KV events.",
            ),
            Panel(
                "Workers by health",
                (Query(f"sum by (state) ({r}_workers{{{MODEL}}})", "{{state}}"),),
                kind="stat",
                width=8,
            ),
            Panel(
                "Indexed KV blocks",
                (Query(f"sum({r}_indexed_blocks{{{MODEL}}})", "blocks"),),
                width=8,
            ),
            Row("Disaggregation"),
            Panel(
                "Prefill placement decisions",
                (
                    Query(
                        f"sum by (decision) ({rate(f'{r}_disagg_decisions_total', MODEL)})",
                        "{{decision}}",
                    ),
                ),
                unit="reqps",
                stack=True,
                description="Where prompts were prefilled. remote: on a prefill worker, KV pulled "
                "by the decode worker; local_short: the uncached part was short, the decode worker "
                "prefilled; local_no_prefill_worker: no healthy prefill worker; "
                "local_prefill_failed: the prefill worker failed, the decode worker prefilled; "
                "aggregated: no prefill workers configured.",
            ),
            Panel(
                "Remote prefill latency",
                quantiles("strata_frontend_remote_prefill_seconds_bucket", MODEL, qs=(0.5, 0.99)),
                unit="s",
                description="The prefill worker's max_tokens=1 request, timed by the frontend "
                "(queueing and prefill there). The decode worker's KV pull follows: see KV pull "
                "time on the Workers dashboard.",
            ),
        ),
    )


def _workers() -> Dashboard:
    def per_worker(metric: str) -> str:
        return f"sum by (instance) ({rate(metric, MODEL_NAME)})"

    tier = MODEL_NAME  # the tier metrics are the worker's (label model_name)
    tier_transport = f'{MODEL_NAME}, transport="tier"'
    info = f"strata_worker_info{{{MODEL_NAME}}}"
    return Dashboard(
        uid="strata-workers",
        title="Strata / Workers and KV cache",
        description="Per-worker engine state (vLLM metric names), KV-cache tiers, and the "
        "prefill/decode roles and KV transfers of disaggregated serving.",
        model_values="label_values(vllm:num_requests_running, model_name)",
        panels=(
            Panel(
                "KV cache usage per worker",
                (
                    Query(
                        f"max by (instance) (vllm:kv_cache_usage_perc{{{MODEL_NAME}}})",
                        "{{instance}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Prefix cache hit rate per worker",
                (
                    Query(
                        f"{per_worker('vllm:prefix_cache_hits_total')}"
                        f" / {per_worker('vllm:prefix_cache_queries_total')}",
                        "{{instance}}",
                    ),
                ),
                unit="percentunit",
                description="Cached / queried prompt tokens.",
            ),
            Panel(
                "Running and waiting per worker",
                (
                    Query(
                        f"sum by (instance) (vllm:num_requests_running{{{MODEL_NAME}}})",
                        "{{instance}} running",
                    ),
                    Query(
                        f"sum by (instance) (vllm:num_requests_waiting{{{MODEL_NAME}}})",
                        "{{instance}} waiting",
                    ),
                ),
            ),
            Panel(
                "Tokens per second per worker",
                (
                    Query(per_worker("vllm:prompt_tokens_total"), "{{instance}} prompt"),
                    Query(per_worker("vllm:generation_tokens_total"), "{{instance}} generation"),
                ),
                unit="suffix: tok/s",
            ),
            Panel(
                "Preemptions per worker",
                (Query(per_worker("vllm:num_preemptions_total"), "{{instance}}"),),
                unit="ops",
                width=8,
            ),
            Panel(
                "Requests by finish reason",
                (
                    Query(
                        f"sum by (finished_reason) "
                        f"({rate('vllm:request_success_total', MODEL_NAME)})",
                        "{{finished_reason}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "Queue time p90 per worker",
                quantiles("vllm:request_queue_time_seconds_bucket", MODEL_NAME, "instance")[1:2],
                unit="s",
                width=8,
            ),
            Panel(
                "Worker time to first token",
                quantiles("vllm:time_to_first_token_seconds_bucket", MODEL_NAME),
                unit="s",
                description="Measured inside the worker (excludes the frontend).",
            ),
            Panel(
                "Worker inter-token latency",
                quantiles("vllm:inter_token_latency_seconds_bucket", MODEL_NAME),
                unit="s",
            ),
            Row("KV cache tiers"),
            Panel(
                "KV tier occupancy",
                (
                    Query(
                        f"sum by (tier) (strata_kv_tier_used_blocks{{{tier}}}) / (sum by (tier) "
                        f"(strata_kv_tier_capacity_blocks{{{tier}}}) > 0)",
                        "{{tier}}",
                    ),
                ),
                unit="percentunit",
                width=8,
                description="G1 device, G2 host, G3 disk, G4 S3 (a G4 without a limit has no "
                "occupancy: see blocks per tier).",
            ),
            Panel(
                "KV blocks per tier",
                (Query(f"sum by (tier) (strata_kv_tier_used_blocks{{{tier}}})", "{{tier}}"),),
                width=8,
                description="G4 counts the blocks this worker's listing of the shared store saw.",
            ),
            Panel(
                "KV tier hit rate",
                (
                    Query(
                        f"sum by (tier) ({rate('strata_kv_tier_hit_blocks_total', tier)}) / "
                        f"ignoring (tier) group_left "
                        f"sum({rate('strata_kv_tier_lookup_blocks_total', tier)})",
                        "{{tier}}",
                    ),
                ),
                unit="percentunit",
                width=8,
                description="Blocks found in each tier / blocks looked up past the device.",
            ),
            Panel(
                "Cost check: onboard or recompute",
                (
                    Query(
                        f"sum by (decision) "
                        f"({rate('strata_kv_tier_onboard_decisions_total', tier)})",
                        "{{decision}}",
                    ),
                ),
                unit="ops",
                width=8,
                description="Requests whose prefix continued below the device: moved up "
                "(onboard) or recomputed because moving it was estimated slower.",
            ),
            Panel(
                "Cost check estimates (p50)",
                tuple(
                    Query(
                        f"histogram_quantile(0.5, sum by (le) "
                        f"({rate(f'strata_kv_tier_estimated_{what}_seconds_bucket', tier)}))",
                        what,
                    )
                    for what in ("onboard", "recompute")
                ),
                unit="s",
                width=8,
                description="Per decision: estimated time to move the prefix's lower-tier blocks "
                "(bytes / measured bandwidth + latency) and to recompute them (measured prefill).",
            ),
            Panel(
                "Blocks refused on onboard",
                (
                    Query(
                        f"sum by (tier, reason) "
                        f"({rate('strata_kv_tier_rejected_blocks_total', tier)})",
                        "{{tier}} {{reason}}",
                    ),
                ),
                unit="ops",
                width=8,
                description="Dropped and recomputed, never served: checksum (bytes damaged), "
                "foreign (another model or version), header (unreadable or another block).",
            ),
            Panel(
                "KV tier copy time",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (tier, direction, le) "
                        f"({rate('strata_kv_tier_transfer_seconds_bucket', tier)}))",
                        f"p{round(q * 100)} {{{{direction}}}} {{{{tier}}}}",
                    )
                    for q in (0.5, 0.99)
                ),
                unit="s",
                width=8,
                description="onboard: one request's blocks into the device (under the tier that "
                "moved most of them); offload: one block's copy into a tier.",
            ),
            Panel(
                "KV tier stores and evictions",
                (
                    Query(
                        f"sum by (tier, outcome) ({rate('strata_kv_tier_stores_total', tier)})",
                        "store {{outcome}} {{tier}}",
                    ),
                    Query(
                        f"sum by (tier) ({rate('strata_kv_tier_evicted_blocks_total', tier)})",
                        "evicted {{tier}}",
                    ),
                ),
                unit="ops",
                width=8,
                description="Copies into each tier (ok, failed, skipped: no evictable room) and "
                "least-recently-used evictions.",
            ),
            Panel(
                "KV tier bytes per second",
                (
                    Query(
                        f"sum by (tier, direction) "
                        f"({rate('strata_kv_transfer_bytes_total', tier_transport)})",
                        "{{direction}} {{tier}}",
                    ),
                ),
                unit="Bps",
                width=8,
                description="Offload (device to a tier, or down a tier) and onboard (into the "
                "device) bytes.",
            ),
            Row("Disaggregation and KV transfer"),
            Panel(
                "Workers by role and KV transport",
                (
                    Query(
                        f"max by (instance, role, transport, fallback) ({info})",
                        "{{instance}}",
                    ),
                ),
                kind="table",
                columns=("instance", "role", "transport", "fallback"),
                cell_colors=(
                    CellColor("fallback", "true", "red", "yes: TCP, NIXL unusable"),
                    CellColor("fallback", "false", "green", "no"),
                ),
                description="Each worker's role (prefill, decode, both) and KV transport (nixl, "
                "tcp, none). fallback: NIXL was unusable and the worker moves KV over plain TCP, "
                "several times slower (alert StrataKVTransportFallback).",
            ),
            Panel(
                "Workers by role",
                (Query(f"count by (role) ({info})", "{{role}}"),),
                kind="stat",
                width=6,
            ),
            Panel(
                "Workers on TCP fallback",
                (
                    Query(
                        f'count(strata_worker_info{{{MODEL_NAME}, fallback="true"}} == 1)'
                        " or vector(0)",
                        "workers",
                    ),
                ),
                kind="stat",
                width=6,
                thresholds=((None, "green"), (1, "red")),
                description="Workers started with --kv-transport auto whose NIXL was unusable.",
            ),
            Panel(
                "KV pulls by outcome",
                (
                    Query(
                        f"sum by (outcome) ({rate('strata_kv_pulls_total', MODEL_NAME)})",
                        "{{outcome}}",
                    ),
                ),
                unit="ops",
                width=8,
                description="Decode workers' pulls of prefilled KV blocks. failed: the decode "
                "worker prefilled the prompt itself (alert StrataKVPullsFailing above 5%).",
            ),
            Panel(
                "KV pull time",
                quantiles(
                    "strata_kv_transfer_seconds_bucket", MODEL_NAME, "transport", qs=(0.5, 0.99)
                ),
                unit="s",
                width=8,
                description="One request's KV pull on the decode worker: connect, transfer, "
                "release notification.",
            ),
            Panel(
                "KV transfer bytes per second",
                (
                    Query(
                        f"sum by (transport, tier, direction) "
                        f"({rate('strata_kv_transfer_bytes_total', MODEL_NAME)})",
                        "{{direction}} {{tier}} {{transport}}",
                    ),
                ),
                unit="Bps",
                width=8,
                description="receive into G1: KV pulled from prefill workers; transport tier: "
                "offload and onboard between KV tiers (also in the KV cache tiers row).",
            ),
            Panel(
                "KV leases held",
                (
                    Query(
                        f"sum by (instance) (strata_kv_leases{{{MODEL_NAME}}})",
                        "{{instance}}",
                    ),
                ),
                description="Prefill results whose KV blocks wait for a decode worker's pull "
                "(on prefill workers).",
            ),
            Panel(
                "KV leases ended by how",
                (
                    Query(
                        f"sum by (how) ({rate('strata_kv_leases_released_total', MODEL_NAME)})",
                        "{{how}}",
                    ),
                ),
                unit="ops",
                description="pulled: a decode worker took the blocks; released: freed early; "
                "expired: no pull within the lease (worker --kv-lease, default 30 s), i.e. lost "
                "decode requests or a lease too short (alert StrataKVLeasesExpiring).",
            ),
        ),
    )


def _lifecycle() -> Dashboard:
    wf = "strata_workflow"
    duration = f"{wf}_step_duration_seconds"
    return Dashboard(
        uid="strata-lifecycle",
        title="Strata / Model lifecycle",
        description="Publish workflows: staging throughput, step durations and outcomes.",
        model_values=f"label_values({duration}_count, model)",
        panels=(
            Panel(
                "Staging throughput",
                (Query(f"sum by (model) ({rate(f'{wf}_stage_bytes_total', MODEL)})", "{{model}}"),),
                unit="Bps",
                description="Bytes copied from S3 onto the model cache.",
            ),
            Panel(
                "Step failures",
                (
                    Query(
                        f"sum by (step) (increase({wf}_step_failures_total{{{MODEL}}}[{RATE}]))",
                        "{{step}}",
                    ),
                ),
            ),
            Panel(
                "Mean step duration (dashboard range)",
                (
                    Query(
                        f"sum by (step) (increase({duration}_sum{{{MODEL}}}[$__range])) / "
                        f"sum by (step) (increase({duration}_count{{{MODEL}}}[$__range]))",
                        "{{step}}",
                    ),
                ),
                unit="s",
                kind="bargauge",
            ),
            Panel(
                "Step outcomes (dashboard range)",
                (
                    Query(
                        f"sum by (step, outcome) (increase({duration}_count{{{MODEL}}}[$__range]))",
                        "{{step}} {{outcome}}",
                    ),
                ),
                kind="bargauge",
            ),
            Panel(
                "Workflow runs by outcome",
                (
                    Query(
                        f"sum by (workflow, outcome) "
                        f"(increase({wf}_runs_total{{{MODEL}}}[$__range]))",
                        "{{workflow}} {{outcome}}",
                    ),
                ),
                kind="bargauge",
                width=24,
            ),
        ),
    )


def _planner() -> Dashboard:
    p = "strata_planner"
    completed = rate("strata_frontend_request_duration_seconds_count", MODEL)
    return Dashboard(
        uid="strata-planner",
        title="Strata / Planner",
        description="Replicas per role, predicted vs observed load, lead time, SLO attainment "
        "and what it costs.",
        model_values="label_values(strata_frontend_requests_total, model)",
        panels=(
            Panel(
                "Replicas per role",
                (
                    Query(f"sum by (role) ({p}_replicas{{{MODEL}}})", "{{role}} serving"),
                    Query(f"sum by (role) ({p}_desired_replicas{{{MODEL}}})", "{{role}} desired"),
                ),
                description="Serving replicas and the planner's target (it orders replicas one "
                "lead time ahead of the load it predicts).",
            ),
            Panel(
                "Replicas starting and draining",
                (
                    Query(f"sum by (role) ({p}_replicas_starting{{{MODEL}}})", "{{role}} starting"),
                    Query(f"sum by (role) ({p}_replicas_draining{{{MODEL}}})", "{{role}} draining"),
                ),
                description="Starting: ordered, not serving yet (the lead time). Draining: no new "
                "requests, finishing their streams before they stop.",
            ),
            Panel(
                "Scaling decisions",
                (
                    Query(
                        f"sum by (role, direction) "
                        f"(increase({p}_scaling_decisions_total{{{MODEL}}}[{RATE}]))",
                        "{{role}} {{direction}}",
                    ),
                ),
            ),
            Panel(
                "Predicted vs observed request rate",
                (
                    Query(f"sum({p}_predicted_request_rate{{{MODEL}}})", "predicted"),
                    Query(f"sum({completed})", "observed"),
                ),
                unit="reqps",
            ),
            Panel(
                "Predicted vs observed tokens per request",
                (
                    Query(f"avg({p}_predicted_input_tokens{{{MODEL}}})", "predicted input"),
                    Query(f"avg({p}_predicted_output_tokens{{{MODEL}}})", "predicted output"),
                    Query(
                        f"sum({rate('strata_frontend_prompt_tokens_total', MODEL)}) / "
                        f"sum({completed})",
                        "observed input",
                    ),
                    Query(
                        f"sum({rate('strata_frontend_output_tokens_total', MODEL)}) / "
                        f"sum({completed})",
                        "observed output",
                    ),
                ),
            ),
            Panel(
                "Scale-up lead time",
                (Query(f"max by (role) ({p}_lead_time_seconds{{{MODEL}}})", "{{role}}"),),
                unit="s",
                description="Scale-up decision to a serving replica: measured once replicas "
                "have come up, else node provisioning + weights (MLflow) + warm-up.",
            ),
            Panel(
                "SLO attainment",
                slo_attainment_queries(),
                unit="percentunit",
                width=8,
            ),
            Panel(
                "Serving cost",
                (Query(f"sum({p}_cost_usd_per_hour{{{MODEL}}})", "USD per hour"),),
                unit="currencyUSD",
                width=8,
                description="GPU-hours of the replicas serving, starting and draining, at the "
                "configured price per GPU-hour of each role's instance type.",
            ),
            Panel(
                "Cost per million output tokens",
                (Query(f"avg({p}_cost_per_million_output_tokens_usd{{{MODEL}}})", "USD"),),
                unit="currencyUSD",
                width=8,
                description="Serving cost over the planner's metrics window / output tokens.",
            ),
            Panel(
                "Capacity correction",
                (Query(f"avg by (kind) ({p}_correction_factor{{{MODEL}}})", "{{kind}}"),),
                description="Observed / expected TTFT and ITL (the profile's capacity is divided "
                "by it; above 1: replicas serve less than profiled).",
            ),
            Panel(
                "Metrics source",
                (Query(f"min({p}_metrics_source_up{{{MODEL}}})", "up"),),
                kind="stat",
                thresholds=((None, "red"), (1, "green")),
                description="0: the planner has no traffic figures and holds every size.",
            ),
        ),
    )


DASHBOARDS: tuple[Dashboard, ...] = (_serving(), _router(), _workers(), _lifecycle(), _planner())
