"""Strata's Grafana dashboards, the one source of truth: ``python -m grafana.generate`` writes them.

Each dashboard is defined in its module under ``grafana.boards``; ``DASHBOARDS`` lists them.

Worker panels use vLLM's metric names (``vllm:*``, label ``model_name``), so they serve Strata
workers and stock ``vllm serve`` workers alike; frontend and router panels use ``strata_*``
(label ``model``). The workers' own disaggregation metrics (``strata_worker_info``,
``strata_kv_*``) carry ``model_name`` too. Per-worker breakdowns of worker metrics use the
scrape target (``instance``).
Panels on metrics no component emits yet would define them in ``grafana.planned_metrics``
(empty now: the KV tiers' metrics, the last planned ones, are the workers').
"""

from __future__ import annotations

from grafana.boards import lifecycle, planner, router, serving, workers
from grafana.panels import Dashboard

DASHBOARDS: tuple[Dashboard, ...] = (
    serving.dashboard(),
    router.dashboard(),
    workers.dashboard(),
    lifecycle.dashboard(),
    planner.dashboard(),
)
