"""The Model lifecycle dashboard: publish workflows' staging throughput, step durations."""

from __future__ import annotations

from grafana.panels import Dashboard, Panel, Query
from grafana.promql import MODEL, RATE, rate


def dashboard() -> Dashboard:
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
