"""Served models: per model name its tokenizer and limits, and per version one router (KV
index, load, policy) with one worker pool. Requests route by the body's ``model``.

During a switch (a new version registered while the old one still streams) new requests go
to the newest version that has a healthy worker; older versions finish what they have (and
migrate among their own workers) until their last worker leaves, and then they are dropped.
Worker ids form one space across all models, so ``/admin/workers/{id}`` needs no model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from serving.frontend.router import Router
from serving.frontend.worker_client import WORKER_KEEPALIVE_S
from serving.frontend.workers import (
    DEFAULT_VERSION,
    Worker,
    WorkerPool,
    WorkerRegistrationError,
    WorkerSpec,
    probe_worker,
)
from serving.protocol.openai import model_not_found

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelVersion:
    """One version of a served model: its router (KV index) and its worker pool."""

    version: str
    router: Router
    pool: WorkerPool


@dataclass(slots=True)
class ServedModel:
    """A model name the frontend serves: tokenizer, limits, versions in registration order."""

    name: str
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    def current(self) -> ModelVersion | None:
        """The version new requests go to: the newest with a healthy worker (else the newest)."""
        versions = list(self.versions.values())
        for version in reversed(versions):
            if version.pool.healthy_ids():
                return version
        return versions[-1] if versions else None

    def version_for(self, version: str | None) -> ModelVersion | None:
        """``version`` while it has a healthy worker (a migrating request stays on its
        version), else the current one."""
        chosen = self.versions.get(version) if version is not None else None
        if chosen is not None and chosen.pool.decode_ids():
            return chosen
        return self.current()

    def workers(self) -> Iterator[Worker]:
        for version in self.versions.values():
            yield from version.pool.workers.values()


class ModelSet:
    """All served models; worker registration across them, health checks, and the worker id
    -> (model, version) map. Used from the event loop only."""

    def __init__(
        self,
        models: list[ServedModel],
        make_router: Callable[[str], Router],
        *,
        block_size: int,
    ) -> None:
        self.models = {m.name: m for m in models}
        self.make_router = make_router
        self.block_size = block_size
        self.http: httpx.AsyncClient | None = None
        self._next_index = 0
        # Called with a worker's URL when it is deregistered on purpose (an operator, the
        # planner, a discovery source): discovery then does not add it back.
        self.on_deregistered: list[Callable[[str], None]] = []

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> ServedModel:
        """The served model; raises ``APIError`` 404 (model_not_found) for an unknown name."""
        model = self.models.get(name)
        if model is None:
            raise model_not_found(name)
        return model

    def versions(self) -> Iterator[tuple[ServedModel, ModelVersion]]:
        for model in self.models.values():
            for version in list(model.versions.values()):
                yield model, version

    def workers(self) -> list[Worker]:
        return [w for model in self.models.values() for w in model.workers()]

    def healthy_ids(self) -> list[str]:
        return [w.worker_id for w in self.workers() if w.healthy]

    def locate(self, worker_id: str) -> tuple[ServedModel, ModelVersion, Worker] | None:
        for model, version in self.versions():
            worker = version.pool.workers.get(worker_id)
            if worker is not None:
                return model, version, worker
        return None

    def pool_of(self, worker_id: str) -> WorkerPool | None:
        found = self.locate(worker_id)
        return found[1].pool if found is not None else None

    def find_url(self, url: str) -> Worker | None:
        return next((w for w in self.workers() if w.url == url), None)

    async def register(self, spec: WorkerSpec) -> Worker:
        """Probe the worker and add it to its model's version pool. Idempotent per URL.

        Raises ``WorkerRegistrationError`` (unreachable, unknown model, duplicate id, ...).
        """
        assert self.http is not None, "ModelSet.start() first"
        existing = self.find_url(spec.url)
        if existing is not None:
            return existing
        probe = await probe_worker(self.http, spec, self.block_size)
        existing = self.find_url(spec.url)  # registered meanwhile (the probe awaited)
        if existing is not None:
            return existing
        name = spec.model or probe.model_name
        model = self.models.get(name)
        if model is None:
            raise WorkerRegistrationError(
                f"worker {spec.url} serves model {name!r}; this frontend serves "
                f"{', '.join(map(repr, self.models))} (set model=... to bind it to one)"
            )
        worker_id = spec.worker_id or self._new_id()
        if self.locate(worker_id) is not None:
            raise WorkerRegistrationError(f"worker id {worker_id!r} is already registered")
        version = self._version(model, spec.version or DEFAULT_VERSION)
        spec = dataclasses.replace(spec, worker_id=worker_id, model=name)
        worker = await version.pool.add(spec, probe)
        self._prune(model)
        return worker

    def deregister(self, worker_id: str) -> Worker | None:
        found = self.locate(worker_id)
        if found is None:
            return None
        model, version, _ = found
        worker = version.pool.deregister(worker_id)
        self._prune(model)
        if worker is not None:
            for listener in self.on_deregistered:
                listener(worker.url)
        return worker

    def mark_failed(self, worker_id: str, reason: str) -> None:
        pool = self.pool_of(worker_id)
        if pool is not None:
            pool.mark_failed(worker_id, reason)

    async def check_health(self, max_failures: int) -> None:
        for model, version in list(self.versions()):
            await version.pool.check_health(max_failures)
            self._prune(model)

    def close(self) -> None:
        for _, version in self.versions():
            version.pool.close()

    def _new_id(self) -> str:
        while True:
            worker_id = f"worker-{self._next_index}"
            self._next_index += 1
            if self.locate(worker_id) is None:
                return worker_id

    def _version(self, model: ServedModel, name: str) -> ModelVersion:
        version = model.versions.get(name)
        if version is not None:
            return version
        assert self.http is not None
        router = self.make_router(model.name)
        pool = WorkerPool(
            self.http,
            on_events=router.apply_events,
            on_added=lambda w: router.add_worker(w.worker_id),
            on_removed=lambda w: router.remove_worker(w.worker_id),
            block_size=self.block_size,
        )
        version = model.versions[name] = ModelVersion(name, router, pool)
        if len(model.versions) > 1:
            logger.info("model %s: version %s added (switching)", model.name, name)
        return version

    def _prune(self, model: ServedModel) -> None:
        """Drop versions without workers, except the newest (it keeps its router warm)."""
        names = list(model.versions)
        for name in names[:-1]:
            version = model.versions[name]
            if not version.pool.workers:
                version.pool.close()
                del model.versions[name]
                logger.info("model %s: version %s has no workers left; dropped", model.name, name)


def make_http_client() -> httpx.AsyncClient:
    """The frontend's one client to its workers (no read timeout: streams last long)."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200,
                          keepalive_expiry=WORKER_KEEPALIVE_S)  # fmt: skip
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=limits)


async def register_all(models: ModelSet, specs: list[WorkerSpec]) -> None:
    """Register start-up workers in order (ids ``worker-0``, ``worker-1``, ... as listed)."""
    for spec in specs:
        await models.register(spec)
