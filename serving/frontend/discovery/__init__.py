"""Worker discovery: sources that say which workers exist, and one reconciler that applies it.

A ``DiscoverySource`` pushes the complete set of workers it knows (``WorkerSpec`` values)
whenever that set changes: ``FileSource`` (a watched YAML/JSON file), ``KubernetesSource``
(EndpointSlices watched through the official client). HTTP registration (``/admin/workers``)
and ``--worker-url`` need no source: they call ``ModelSet.register`` directly.

``Discovery`` registers new workers, deregisters those a source dropped (only the ones it
registered itself: HTTP registrations are never touched), retries workers that were not
reachable yet, and sets ``synced`` once the first set has been applied (every listed worker
registered, its KV events replayed, or found unreachable and left for a retry), so a restarted
frontend reports ready only when it knows its workers and their caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import httpx

from serving.frontend.models import ModelSet
from serving.frontend.workers import WorkerRegistrationError, WorkerSpec

logger = logging.getLogger(__name__)

Publish = Callable[[list[WorkerSpec]], Awaitable[None]]


class DiscoverySource(Protocol):
    name: str

    async def run(self, publish: Publish) -> None:
        """Call ``publish`` with the full set of workers now and after every change; runs
        until cancelled. Errors reading the source are logged and the last set stays."""


class StaticSource:
    """A fixed list (``--worker-url``, ``strata serve``'s local workers): a worker dropped
    after failed health checks is registered again once it answers (a restarted process)."""

    name = "static"

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = list(specs)

    async def run(self, publish: Publish) -> None:
        await publish(self.specs)
        await asyncio.Event().wait()  # the list never changes


class Discovery:
    """Applies a source's worker sets to the ``ModelSet``; owns the workers it registered."""

    def __init__(
        self, models: ModelSet, source: DiscoverySource, *, retry_interval_s: float = 1.0
    ) -> None:
        self.models = models
        self.source = source
        self.retry_interval_s = retry_interval_s
        self.synced = asyncio.Event()
        self._desired: dict[str, WorkerSpec] = {}  # url -> spec
        self._owned: dict[str, str] = {}  # url -> worker id
        self._changed = asyncio.Event()
        self._first_set_seen = False
        self._warned: set[str] = set()
        models.on_deregistered.append(self.forget)

    async def run(self) -> None:
        """The source's loop and the reconcile loop; runs until cancelled."""
        reconcile = asyncio.create_task(self._reconcile_loop())
        try:
            await self.source.run(self.publish)
        finally:
            reconcile.cancel()

    async def publish(self, specs: list[WorkerSpec]) -> None:
        self._desired = {spec.url: spec for spec in specs}
        self._first_set_seen = True
        self._changed.set()

    def forget(self, url: str) -> None:
        """An operator removed the worker (``DELETE /admin/workers``): do not add it back
        until the source lists it again in a new set."""
        self._desired.pop(url, None)
        self._owned.pop(url, None)

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.retry_interval_s)
            self._changed.clear()
            if self._first_set_seen:
                try:
                    await self.reconcile()
                except Exception:  # a bug must not end discovery: log it, try again
                    logger.exception("%s discovery: reconcile failed", self.source.name)

    async def reconcile(self) -> None:
        """One pass: drop what left, add what is new (unreachable ones wait for the next)."""
        for url, worker_id in list(self._owned.items()):
            if url not in self._desired or self.models.locate(worker_id) is None:
                del self._owned[url]
                if url not in self._desired and self.models.deregister(worker_id) is not None:
                    logger.info("%s discovery: worker %s (%s) left", self.source.name,
                                worker_id, url)  # fmt: skip
        pending = [s for url, s in self._desired.items() if url not in self._owned]
        await asyncio.gather(*(self._add(spec) for spec in pending))
        if not self.synced.is_set():  # every listed worker tried once (added, or retried later)
            self.synced.set()
            logger.info("%s discovery: first sync, %d of %d worker(s) added", self.source.name,
                        len(self._owned), len(self._desired))  # fmt: skip

    async def _add(self, spec: WorkerSpec) -> bool:
        if self.models.find_url(spec.url) is not None:  # registered by hand or statically
            return True
        try:
            worker = await self.models.register(spec)
        except (WorkerRegistrationError, httpx.HTTPError) as exc:
            if spec.url not in self._warned:  # once per outage, not every retry
                self._warned.add(spec.url)
                logger.warning("%s discovery: %s not added yet (retrying): %s",
                               self.source.name, spec.url, exc)  # fmt: skip
            return False
        self._warned.discard(spec.url)
        if spec.url in self._desired:
            self._owned[spec.url] = worker.worker_id
        return True
