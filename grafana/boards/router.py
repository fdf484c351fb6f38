"""The Router dashboard: routing decisions, KV-cache hit rate, per-worker load, the KV event feed
and where prompts are prefilled (disaggregation)."""

from __future__ import annotations

from grafana.panels import Dashboard, Panel, Query, Row, thirds
from grafana.promql import MODEL, RATE, per_worker_or_zero, quantiles, rate

R = "strata_router"


def dashboard() -> Dashboard:
    return Dashboard(
        uid="strata-router",
        title="Strata / Router",
        description="Routing decisions, KV-cache hit rate, per-worker load, the KV event feed "
        "and where prompts are prefilled (disaggregation).",
        model_values="label_values(strata_frontend_requests_total, model)",
        panels=(
            *_decision_panels(),
            *thirds(*_load_panels(), *_kv_event_panels()),
            *_disagg_panels(),
        ),
    )


def _decision_panels() -> tuple[Panel, ...]:
    decisions = f"{R}_decisions_total"
    per_worker_rate = f"sum by (worker) ({rate(decisions, MODEL)})"
    every_worker_rate = per_worker_or_zero(
        rate(decisions, MODEL), f"{R}_worker_active_requests{{{MODEL}}}"
    )
    prompt_rate = f"sum({rate('strata_frontend_prompt_tokens_total', MODEL)})"
    return (
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
                    f"sum({rate(f'{R}_predicted_cached_tokens_total', MODEL)}) / {prompt_rate}",
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
    )


def _load_panels() -> tuple[Panel, ...]:
    """The router's own count of each worker's requests, blocks and prompt tokens in flight."""
    return (
        Panel(
            "Active requests per worker",
            (Query(f"sum by (worker) ({R}_worker_active_requests{{{MODEL}}})", "{{worker}}"),),
        ),
        Panel(
            "Active decode blocks per worker",
            (
                Query(
                    f"sum by (worker) ({R}_worker_active_decode_blocks{{{MODEL}}})",
                    "{{worker}}",
                ),
            ),
            description="KV blocks of requests in flight (router's own count).",
        ),
        Panel(
            "Active prefill tokens per worker",
            (
                Query(
                    f"sum by (worker) ({R}_worker_active_prefill_tokens{{{MODEL}}})",
                    "{{worker}}",
                ),
            ),
            description="Uncached prompt tokens waiting for their first token.",
        ),
    )


def _kv_event_panels() -> tuple[Panel, ...]:
    """The workers' KV event feed into the router's index."""
    return (
        Panel(
            "KV events applied by type",
            (Query(f"sum by (type) ({rate(f'{R}_kv_events_total', MODEL)})", "{{type}}"),),
            unit="ops",
        ),
        Panel(
            "KV event batches per worker",
            (
                Query(
                    f"sum by (worker) ({rate(f'{R}_kv_event_batches_total', MODEL)})",
                    "{{worker}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Lost KV event batches per worker",
            (
                Query(
                    per_worker_or_zero(
                        f"increase({R}_kv_event_lost_batches_total{{{MODEL}}}[{RATE}])",
                        f"{R}_kv_event_batches_total{{{MODEL}}}",
                    ),
                    "{{worker}}",
                ),
            ),
            description="Sequence gaps the replay could not fill.",
        ),
        Panel(
            "Workers without KV events",
            (Query(f"sum({R}_workers_without_kv_events{{{MODEL}}})", "workers"),),
            kind="stat",
            description="Workers that serve requests but publish no KV events.",
        ),
        Panel(
            "Workers by health",
            (Query(f"sum by (state) ({R}_workers{{{MODEL}}})", "{{state}}"),),
            kind="stat",
        ),
        Panel(
            "Indexed KV blocks",
            (Query(f"sum({R}_indexed_blocks{{{MODEL}}})", "blocks"),),
        ),
    )


def _disagg_panels() -> tuple[Panel | Row, ...]:
    return (
        Row("Disaggregation"),
        Panel(
            "Prefill placement decisions",
            (
                Query(
                    f"sum by (decision) ({rate(f'{R}_disagg_decisions_total', MODEL)})",
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
    )
