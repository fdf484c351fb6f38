"""Workflow metrics (``strata_workflow_*``), recorded by the local runner and the steps.

A workflow run is short-lived, so these live in their own registry that a long-lived process
exposes: ``strata demo`` adds it to its frontend's ``/metrics``. Names and labels match the
lifecycle dashboard and the staging alert (docs/observability.md).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

WORKFLOW_REGISTRY = CollectorRegistry()

STEP_DURATION_BUCKETS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

STEP_DURATION = Histogram(
    "strata_workflow_step_duration_seconds",
    "Duration of workflow steps, by outcome.",
    ("model", "step", "outcome"),
    buckets=STEP_DURATION_BUCKETS_S,
    registry=WORKFLOW_REGISTRY,
)
STEP_FAILURES = Counter(
    "strata_workflow_step_failures",
    "Workflow steps that failed (after their retries).",
    ("model", "step"),
    registry=WORKFLOW_REGISTRY,
)
RUNS = Counter(
    "strata_workflow_runs",
    "Workflow runs by outcome.",
    ("model", "workflow", "outcome"),
    registry=WORKFLOW_REGISTRY,
)
STAGE_BYTES = Counter(
    "strata_workflow_stage_bytes",
    "Bytes downloaded from S3 by the stage step.",
    ("model",),
    registry=WORKFLOW_REGISTRY,
)


def init_model(model: str, steps: list[str]) -> None:
    """Create every series at 0, so rates and increases work from the first failure."""
    for step in steps:
        STEP_FAILURES.labels(model=model, step=step)
    STAGE_BYTES.labels(model=model)
