"""Background upkeep: worker health checks, the KV-events warning, Prometheus file-SD targets,
and the gauges refreshed on each scrape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from serving.frontend.state import FrontendState
from serving.frontend.workers import Worker

logger = logging.getLogger(__name__)


async def health_loop(state: FrontendState) -> None:
    settings = state.settings
    while True:
        await asyncio.sleep(settings.health_interval_s)
        with contextlib.suppress(Exception):
            await state.models.check_health(settings.max_health_failures)
        check_kv_events(state)
        write_prometheus_targets(state)


def check_kv_events(state: FrontendState) -> None:
    """Loud warning when kv routing is asked for but a worker publishes no events."""
    now = time.monotonic()
    silent = dict.fromkeys(state.models.names, 0)
    for model, version in state.models.versions():
        if version.router.policy_name == "kv":
            for worker in version.pool.workers.values():
                silent[model.name] += _is_silent(state, worker, now)
    for name, count in silent.items():
        state.metrics.workers_without_events.labels(model=name).set(count)


def _is_silent(state: FrontendState, worker: Worker, now: float) -> bool:
    if worker.num_event_batches > 0 or worker.first_request_s is None:
        return False
    if now - worker.first_request_s < state.settings.kv_events_grace_s:
        return False
    if not worker.warned_no_events:
        worker.warned_no_events = True
        logger.warning(
            "!!! --router kv, but worker %s (%s) has published no KV events: routing to it "
            "is blind to its cache. Start it with a KV-events publisher (strata worker "
            "--kv-events-port, vllm serve --kv-events-config ...) or use --router approx.",
            worker.worker_id,
            worker.url,
        )
    return True


def write_prometheus_targets(state: FrontendState) -> None:
    """File service discovery for Prometheus: the frontend and every registered worker."""
    path = state.settings.prometheus_targets_file
    if path is None:
        return
    groups: list[dict[str, Any]] = []
    if state.settings.self_address:
        groups.append({"targets": [state.settings.self_address],
                       "labels": {"component": "frontend"}})  # fmt: skip
    for worker in state.models.workers():
        labels = {"component": "worker", "worker": worker.worker_id}
        groups.append({"targets": [urlsplit(worker.url).netloc], "labels": labels})
    text = json.dumps(groups, indent=1)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: Prometheus never reads half a file


def refresh_gauges(state: FrontendState) -> None:
    """Per model: workers by health, indexed blocks (all versions), lost KV-event batches."""
    metrics = state.metrics
    for model in state.models.models.values():
        workers = list(model.workers())
        healthy = sum(w.healthy for w in workers)
        metrics.workers.labels(model=model.name, state="healthy").set(healthy)
        metrics.workers.labels(model=model.name, state="unhealthy").set(len(workers) - healthy)
        blocks = sum(len(v.router.indexer) for v in model.versions.values())
        metrics.indexed_blocks.labels(model=model.name).set(blocks)
        for worker in workers:
            if worker.subscriber is None:
                continue
            lost = worker.subscriber.num_lost_batches
            if lost > worker.num_lost_batches:
                metrics.kv_event_gaps.labels(model=model.name, worker=worker.worker_id).inc(
                    lost - worker.num_lost_batches
                )
                worker.num_lost_batches = lost
