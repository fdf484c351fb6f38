"""What a Strata frontend tells a load generator about its workers: ``/admin/workers`` and
per-worker router series sampled from ``/metrics`` while the load runs.

The frontend does not say which worker served a response, so per-worker load comes from two of
its series, sampled every ``interval_s``:

* ``strata_router_worker_active_requests{worker}``: requests in flight per worker (a gauge);
* ``strata_router_decisions_total{policy,reason,worker}``: routing decisions, summed per worker
  (a counter; deltas between samples are requests routed per interval).

Any other endpoint (a bare worker, another server) has neither series; the sampler then records
nothing and the report leaves the per-worker plot out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ACTIVE_REQUESTS = "strata_router_worker_active_requests"
DECISIONS = "strata_router_decisions"  # the parser strips the counter's ``_total``


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One scrape: seconds since the run's start, in-flight and cumulative routed per worker."""

    t_s: float
    active_requests: dict[str, float]
    routed_total: dict[str, float]
    policies: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "t_s": round(self.t_s, 3),
            "active_requests": self.active_requests,
            "routed_total": self.routed_total,
        }


def root_url(base_url: str) -> str:
    """``http://h:p/v1`` -> ``http://h:p`` (the frontend's admin and metrics paths)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def parse_worker_series(text: str, t_s: float) -> WorkerSample | None:
    """Per-worker router series from a Prometheus text exposition; ``None`` if it has none."""
    active: dict[str, float] = {}
    routed: dict[str, float] = {}
    policies: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.name not in (ACTIVE_REQUESTS, DECISIONS):
            continue
        for sample in family.samples:
            worker = sample.labels.get("worker")
            if worker is None or sample.name.endswith("_created"):
                continue
            if family.name == ACTIVE_REQUESTS:
                active[worker] = sample.value
            else:
                routed[worker] = routed.get(worker, 0.0) + sample.value
                policies.add(sample.labels.get("policy", ""))
    if not active and not routed:
        return None
    for worker in active.keys() | routed.keys():  # a worker seen in one series only
        active.setdefault(worker, 0.0)
        routed.setdefault(worker, 0.0)
    return WorkerSample(t_s, active, routed, tuple(sorted(policies - {""})))


async def list_workers(client: httpx.AsyncClient, root: str) -> list[dict[str, Any]] | None:
    """``GET {root}/admin/workers`` (id, url, health); ``None`` when the endpoint has none."""
    try:
        response = await client.get(f"{root}/admin/workers", timeout=5.0)
        if response.status_code != 200:
            return None
        workers = response.json().get("workers")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(workers, list):
        return None
    keep = ("worker_id", "url", "healthy")
    return [{key: w.get(key) for key in keep} for w in workers if isinstance(w, dict)]


async def scrape(client: httpx.AsyncClient, root: str, t_s: float) -> WorkerSample | None:
    """One ``/metrics`` scrape; ``None`` on an error or an endpoint without router series."""
    try:
        response = await client.get(f"{root}/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return parse_worker_series(response.text, t_s)
    except ValueError:  # not a Prometheus exposition
        return None


async def sample_workers(
    client: httpx.AsyncClient,
    root: str,
    started: float,
    interval_s: float,
    stop: asyncio.Event,
) -> list[WorkerSample]:
    """Scrape every ``interval_s`` until ``stop`` is set, then once more; times from ``started``
    (a ``time.perf_counter()`` value). Returns ``[]`` if the first scrape finds no series."""
    samples: list[WorkerSample] = []
    while True:
        sample = await scrape(client, root, time.perf_counter() - started)
        if sample is None and not samples:
            return []
        if sample is not None:
            samples.append(sample)
        if stop.is_set():
            return samples
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
