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

logger = logging.getLogger(__name__)


async def health_loop(state: FrontendState) -> None:
    settings = state.settings
    while True:
        await asyncio.sleep(settings.health_interval_s)
        assert state.pool is not None
        with contextlib.suppress(Exception):
            await state.pool.check_health(settings.max_health_failures)
        check_kv_events(state)
        write_prometheus_targets(state)


def check_kv_events(state: FrontendState) -> None:
    """Loud warning when kv routing is asked for but a worker publishes no events."""
    if state.router.policy_name != "kv" or state.pool is None:
        return
    now = time.monotonic()
    silent = 0
    for worker in state.pool.workers.values():
        if worker.num_event_batches > 0 or worker.first_request_s is None:
            continue
        if now - worker.first_request_s < state.settings.kv_events_grace_s:
            continue
        silent += 1
        if not worker.warned_no_events:
            worker.warned_no_events = True
            logger.warning(
                "!!! --router kv, but worker %s (%s) has published no KV events: routing to it "
                "is blind to its cache. Start it with a KV-events publisher (strata worker "
                "--kv-events-port, vllm serve --kv-events-config ...) or use --router approx.",
                worker.worker_id,
                worker.url,
            )
    state.metrics.workers_without_events.set(silent)


def write_prometheus_targets(state: FrontendState) -> None:
    """File service discovery for Prometheus: the frontend and every registered worker."""
    path = state.settings.prometheus_targets_file
    if path is None or state.pool is None:
        return
    groups: list[dict[str, Any]] = []
    if state.settings.self_address:
        groups.append({"targets": [state.settings.self_address],
                       "labels": {"component": "frontend"}})  # fmt: skip
    for worker in state.pool.workers.values():
        address = urlsplit(worker.url).netloc
        groups.append(
            {"targets": [address], "labels": {"component": "worker", "worker": worker.worker_id}}
        )
    text = json.dumps(groups, indent=1)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: Prometheus never reads half a file


def refresh_gauges(state: FrontendState) -> None:
    if state.pool is None:
        return
    for worker in state.pool.workers.values():
        if worker.subscriber is None:
            continue
        lost = worker.subscriber.num_lost_batches
        if lost > worker.num_lost_batches:
            state.metrics.kv_event_gaps.labels(worker=worker.worker_id).inc(
                lost - worker.num_lost_batches
            )
            worker.num_lost_batches = lost
    healthy = len(state.pool.healthy_ids())
    state.metrics.workers.labels(state="healthy").set(healthy)
    state.metrics.workers.labels(state="unhealthy").set(len(state.pool.workers) - healthy)
