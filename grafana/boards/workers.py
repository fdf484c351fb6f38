"""The Workers dashboard: per-worker engine state (vLLM metric names), the KV-cache tiers
(``grafana.boards.kv_tiers``), and the prefill/decode roles and KV transfers of disaggregated
serving."""

from __future__ import annotations

from grafana.boards.kv_tiers import kv_tier_panels
from grafana.panels import CellColor, Dashboard, Panel, Query, Row, thirds
from grafana.promql import MODEL_NAME, quantiles, rate

INFO = f"strata_worker_info{{{MODEL_NAME}}}"


def dashboard() -> Dashboard:
    return Dashboard(
        uid="strata-workers",
        title="Strata / Workers and KV cache",
        description="Per-worker engine state (vLLM metric names), KV-cache tiers, and the "
        "prefill/decode roles and KV transfers of disaggregated serving.",
        model_values="label_values(vllm:num_requests_running, model_name)",
        panels=(
            *_engine_load_panels(),
            *_engine_latency_panels(),
            *kv_tier_panels(),
            *_role_panels(),
            *_kv_pull_panels(),
        ),
    )


def _per_worker(metric: str) -> str:
    return f"sum by (instance) ({rate(metric, MODEL_NAME)})"


def _engine_load_panels() -> tuple[Panel, ...]:
    return (
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
                    f"{_per_worker('vllm:prefix_cache_hits_total')}"
                    f" / {_per_worker('vllm:prefix_cache_queries_total')}",
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
                Query(_per_worker("vllm:prompt_tokens_total"), "{{instance}} prompt"),
                Query(_per_worker("vllm:generation_tokens_total"), "{{instance}} generation"),
            ),
            unit="suffix: tok/s",
        ),
    )


def _engine_latency_panels() -> tuple[Panel, ...]:
    return (
        *thirds(
            Panel(
                "Preemptions per worker",
                (Query(_per_worker("vllm:num_preemptions_total"), "{{instance}}"),),
                unit="ops",
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
            ),
            Panel(
                "Queue time p90 per worker",
                quantiles("vllm:request_queue_time_seconds_bucket", MODEL_NAME, "instance")[1:2],
                unit="s",
            ),
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
    )


def _role_panels() -> tuple[Panel | Row, ...]:
    """Each worker's role and KV transport, and the workers on the TCP fallback."""
    return (
        Row("Disaggregation and KV transfer"),
        Panel(
            "Workers by role and KV transport",
            (
                Query(
                    f"max by (instance, role, transport, fallback) ({INFO})",
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
            (Query(f"count by (role) ({INFO})", "{{role}}"),),
            kind="stat",
            width=6,
        ),
        Panel(
            "Workers on TCP fallback",
            (
                Query(
                    f'count(strata_worker_info{{{MODEL_NAME}, fallback="true"}} == 1) or vector(0)',
                    "workers",
                ),
            ),
            kind="stat",
            width=6,
            thresholds=((None, "green"), (1, "red")),
            description="Workers started with --kv-transport auto whose NIXL was unusable.",
        ),
    )


def _kv_pull_panels() -> tuple[Panel, ...]:
    """Decode workers' pulls of prefilled KV, and the prefill workers' leases waiting for them."""
    return (
        *thirds(
            Panel(
                "KV pulls by outcome",
                (
                    Query(
                        f"sum by (outcome) ({rate('strata_kv_pulls_total', MODEL_NAME)})",
                        "{{outcome}}",
                    ),
                ),
                unit="ops",
                description="Decode workers' pulls of prefilled KV blocks. failed: the decode "
                "worker prefilled the prompt itself (alert StrataKVPullsFailing above 5%).",
            ),
            Panel(
                "KV pull time",
                quantiles(
                    "strata_kv_transfer_seconds_bucket", MODEL_NAME, "transport", qs=(0.5, 0.99)
                ),
                unit="s",
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
                description="receive into G1: KV pulled from prefill workers; transport tier: "
                "offload and onboard between KV tiers (also in the KV cache tiers row).",
            ),
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
    )
