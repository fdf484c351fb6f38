"""The Planner dashboard: replicas per role, predicted vs observed load, lead time, SLO
attainment and what it costs."""

from __future__ import annotations

from grafana.panels import Dashboard, Panel, Query, thirds
from grafana.promql import MODEL, RATE, rate, slo_attainment_queries

P = "strata_planner"


def dashboard() -> Dashboard:
    return Dashboard(
        uid="strata-planner",
        title="Strata / Planner",
        description="Replicas per role, predicted vs observed load, lead time, SLO attainment "
        "and what it costs.",
        model_values="label_values(strata_frontend_requests_total, model)",
        panels=(*_replica_panels(), *_prediction_panels(), *_cost_panels()),
    )


def _replica_panels() -> tuple[Panel, ...]:
    return (
        Panel(
            "Replicas per role",
            (
                Query(f"sum by (role) ({P}_replicas{{{MODEL}}})", "{{role}} serving"),
                Query(f"sum by (role) ({P}_desired_replicas{{{MODEL}}})", "{{role}} desired"),
            ),
            description="Serving replicas and the planner's target (it orders replicas one "
            "lead time ahead of the load it predicts).",
        ),
        Panel(
            "Replicas starting and draining",
            (
                Query(f"sum by (role) ({P}_replicas_starting{{{MODEL}}})", "{{role}} starting"),
                Query(f"sum by (role) ({P}_replicas_draining{{{MODEL}}})", "{{role}} draining"),
            ),
            description="Starting: ordered, not serving yet (the lead time). Draining: no new "
            "requests, finishing their streams before they stop.",
        ),
        Panel(
            "Scaling decisions",
            (
                Query(
                    f"sum by (role, direction) "
                    f"(increase({P}_scaling_decisions_total{{{MODEL}}}[{RATE}]))",
                    "{{role}} {{direction}}",
                ),
            ),
        ),
    )


def _prediction_panels() -> tuple[Panel, ...]:
    """The planner's predicted load next to the frontend's observed load."""
    completed = rate("strata_frontend_request_duration_seconds_count", MODEL)
    return (
        Panel(
            "Predicted vs observed request rate",
            (
                Query(f"sum({P}_predicted_request_rate{{{MODEL}}})", "predicted"),
                Query(f"sum({completed})", "observed"),
            ),
            unit="reqps",
        ),
        Panel(
            "Predicted vs observed tokens per request",
            (
                Query(f"avg({P}_predicted_input_tokens{{{MODEL}}})", "predicted input"),
                Query(f"avg({P}_predicted_output_tokens{{{MODEL}}})", "predicted output"),
                Query(
                    f"sum({rate('strata_frontend_prompt_tokens_total', MODEL)}) / sum({completed})",
                    "observed input",
                ),
                Query(
                    f"sum({rate('strata_frontend_output_tokens_total', MODEL)}) / sum({completed})",
                    "observed output",
                ),
            ),
        ),
        Panel(
            "Scale-up lead time",
            (Query(f"max by (role) ({P}_lead_time_seconds{{{MODEL}}})", "{{role}}"),),
            unit="s",
            description="Scale-up decision to a serving replica: measured once replicas "
            "have come up, else node provisioning + weights (MLflow) + warm-up.",
        ),
    )


def _cost_panels() -> tuple[Panel, ...]:
    return (
        *thirds(
            Panel(
                "SLO attainment",
                slo_attainment_queries(),
                unit="percentunit",
            ),
            Panel(
                "Serving cost",
                (Query(f"sum({P}_cost_usd_per_hour{{{MODEL}}})", "USD per hour"),),
                unit="currencyUSD",
                description="GPU-hours of the replicas serving, starting and draining, at the "
                "configured price per GPU-hour of each role's instance type.",
            ),
            Panel(
                "Cost per million output tokens",
                (Query(f"avg({P}_cost_per_million_output_tokens_usd{{{MODEL}}})", "USD"),),
                unit="currencyUSD",
                description="Serving cost over the planner's metrics window / output tokens.",
            ),
        ),
        Panel(
            "Capacity correction",
            (Query(f"avg by (kind) ({P}_correction_factor{{{MODEL}}})", "{{kind}}"),),
            description="Observed / expected TTFT and ITL (the profile's capacity is divided "
            "by it; above 1: replicas serve less than profiled).",
        ),
        Panel(
            "Metrics source",
            (Query(f"min({P}_metrics_source_up{{{MODEL}}})", "up"),),
            kind="stat",
            thresholds=((None, "red"), (1, "green")),
            description="0: the planner has no traffic figures and holds every size.",
        ),
    )
