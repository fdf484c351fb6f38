"""The Serving dashboard: the OpenAI endpoint as clients see it, admission control, API keys."""

from __future__ import annotations

from grafana.panels import Dashboard, Panel, Query, Row, thirds
from grafana.promql import MODEL, MODEL_NAME, quantiles, rate, slo_attainment_queries

FE = "strata_frontend"


def dashboard() -> Dashboard:
    return Dashboard(
        uid="strata-serving",
        title="Strata / Serving",
        description="The OpenAI endpoint as clients see it (frontend) and the workers' queues.",
        model_values=f"label_values({FE}_requests_total, model)",
        panels=(*_request_panels(), *_admission_panels()),
    )


def _request_panels() -> tuple[Panel, ...]:
    requests = f"{FE}_requests_total"
    errors = MODEL + ', status!~"2.."'
    return (
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
            quantiles(f"{FE}_time_to_first_token_seconds_bucket", MODEL),
            unit="s",
            description="Arrival at the frontend to the first token sent to the client.",
        ),
        Panel(
            "Inter-token latency",
            quantiles(f"{FE}_inter_token_latency_seconds_bucket", MODEL),
            unit="s",
            description="Time between tokens sent to the client.",
        ),
        Panel(
            "End-to-end request latency",
            quantiles(f"{FE}_request_duration_seconds_bucket", MODEL),
            unit="s",
            description="Arrival to the last token.",
        ),
        Panel(
            "Tokens per second",
            (
                Query(f"sum({rate(f'{FE}_prompt_tokens_total', MODEL)})", "prompt (in)"),
                Query(f"sum({rate(f'{FE}_output_tokens_total', MODEL)})", "output (out)"),
            ),
            unit="suffix: tok/s",
        ),
        Panel(
            "Running and waiting requests",
            (
                Query(f"sum(vllm:num_requests_running{{{MODEL_NAME}}})", "running (workers)"),
                Query(f"sum(vllm:num_requests_waiting{{{MODEL_NAME}}})", "waiting (workers)"),
                Query(f"sum({FE}_active_requests{{{MODEL}}})", "in flight (frontend)"),
            ),
            description="Workers' batch and queue; the frontend's requests in flight.",
        ),
        Panel(
            "Migrations",
            (Query(f"sum({rate(f'{FE}_migrations_total', MODEL)})", "migrations"),),
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
    )


def _admission_panels() -> tuple[Panel | Row, ...]:
    """The frontend's admission control and API keys."""
    limit = f"{FE}_admission_limit"
    return (
        Row("Admission and API keys"),
        *thirds(
            Panel(
                "Refused requests by reason",
                (
                    Query(
                        f"sum by (reason) ({rate(f'{FE}_rejected_requests_total', MODEL)})",
                        "{{reason}}",
                    ),
                ),
                unit="reqps",
                stack=True,
                description="429 with Retry-After: inflight_limit, queued_tokens_limit (the "
                "model's), key_requests_per_minute, key_tokens_per_minute (the API key's); 413: "
                "request_too_large.",
            ),
            Panel(
                "Requests in flight vs limit",
                (
                    Query(f"sum({FE}_active_requests{{{MODEL}}})", "in flight"),
                    Query(f'sum({limit}{{{MODEL}, limit="inflight_requests"}}) > 0', "limit"),
                ),
                description="Per model, beyond the limit new requests get 429 at once.",
            ),
            Panel(
                "Queued prompt tokens vs limit",
                (
                    Query(f"sum({FE}_queued_prompt_tokens{{{MODEL}}})", "queued"),
                    Query(f'sum({limit}{{{MODEL}, limit="queued_prompt_tokens"}}) > 0', "limit"),
                ),
                description="Prompt tokens of admitted requests still waiting for a first token.",
            ),
            Panel(
                "Time to 429",
                quantiles(f"{FE}_rejection_seconds_bucket", MODEL, qs=(0.5, 0.99)),
                unit="s",
                description="Arrival at the frontend to its 429 answer (target: under 50 ms).",
            ),
            Panel(
                "Requests per API key",
                (
                    Query(
                        f"sum by (key, outcome) ({rate(f'{FE}_key_requests_total', MODEL)})",
                        "{{key}} {{outcome}}",
                    ),
                ),
                unit="reqps",
                description="Keys with rate limits (keys file): admitted and rejected.",
            ),
            Panel(
                "Tokens per API key",
                (Query(f"sum by (key) ({rate(f'{FE}_key_tokens_total', MODEL)})", "{{key}}"),),
                unit="suffix: tok/s",
                description="Prompt plus output tokens used by rate-limited keys.",
            ),
        ),
    )
