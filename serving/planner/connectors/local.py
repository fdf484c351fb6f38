"""The local connector: worker processes of ``strata serve --planner``.

A scale-up starts a worker process through ``strata serve``'s supervisor, waits until it is
healthy and registers it with the frontend (``POST /admin/workers``): the time from the order
to the registration is the measured lead time. A scale-down cancels workers still starting
(their process stops, they were never routed to), else drains the ready worker with the fewest
streams: the frontend stops routing to it (``POST /admin/workers/{id}/drain``), its streams
finish (until the drain deadline), then its process gets SIGTERM (it finishes what it still has
within its own drain timeout; anything cut migrates) and it is deregistered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from serving.planner.config import DrainConfig, Role
from serving.planner.connectors.base import (
    Connector,
    ConnectorError,
    ReplicaCounts,
    scale_down_plan,
)
from serving.planner.connectors.frontend_admin import FrontendAdmin

logger = logging.getLogger(__name__)


class LocalWorkerHandle(Protocol):
    url: str
    worker_id: str
    role: str


class Supervisor(Protocol):
    """What ``strata serve``'s ``WorkerSupervisor`` offers the planner."""

    def spawn(self, role: str) -> LocalWorkerHandle: ...

    def wait_worker_healthy(self, worker: LocalWorkerHandle, timeout_s: float) -> None: ...

    def stop_worker(self, worker: LocalWorkerHandle, timeout_s: float) -> None: ...


@dataclass
class _Managed:
    handle: LocalWorkerHandle
    state: str  # starting | ready | draining
    ordered_s: float


class LocalConnector(Connector):
    name = "local"

    def __init__(
        self,
        supervisor: Supervisor,
        frontend: FrontendAdmin,
        roles: tuple[Role, ...],
        *,
        model: str,
        drain: DrainConfig,
        initial: Sequence[LocalWorkerHandle] = (),
        startup_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.supervisor = supervisor
        self.frontend = frontend
        self.roles = roles
        self.model = model
        self.drain_config = drain
        self.startup_timeout_s = startup_timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, _Managed] = {
            w.worker_id: _Managed(w, "ready", clock()) for w in initial
        }
        self._lead_times: dict[str, list[float]] = {}
        self._threads: list[threading.Thread] = []
        self.events: list[tuple[str, str, str]] = []  # (event, role, worker id), for tests/logs

    def replica_counts(self) -> dict[Role, ReplicaCounts]:
        with self._lock:
            out = {}
            for role in self.roles:
                states = [m.state for m in self._workers.values() if m.handle.role == role]
                out[role] = ReplicaCounts(
                    ready=states.count("ready"),
                    starting=states.count("starting"),
                    draining=states.count("draining"),
                    lead_times_s=tuple(self._lead_times.pop(role, ())),
                )
            return out

    def set_replicas(self, role: Role, target: int) -> None:
        counts = self.replica_counts()[role]
        for _ in range(max(target - counts.current, 0)):
            self._start(role)
        cancel, drain = scale_down_plan(target, counts.ready, counts.starting)
        with self._lock:
            starting = [m for m in self._workers.values()
                        if m.handle.role == role and m.state == "starting"]  # fmt: skip
        for managed in sorted(starting, key=lambda m: -m.ordered_s)[:cancel]:
            self._cancel(managed)
        if drain:
            for managed in self._drain_candidates(role)[:drain]:
                self._drain(managed)

    # -- up ------------------------------------------------------------------------------------

    def _start(self, role: Role) -> None:
        handle = self.supervisor.spawn(role)
        managed = _Managed(handle, "starting", self.clock())
        with self._lock:
            self._workers[handle.worker_id] = managed
        self.events.append(("start", role, handle.worker_id))
        self._thread(self._bring_up, managed)

    def _bring_up(self, managed: _Managed) -> None:
        handle = managed.handle
        try:
            self.supervisor.wait_worker_healthy(handle, self.startup_timeout_s)
            with self._lock:
                if managed.state != "starting":
                    return  # cancelled meanwhile
            self.frontend.register(handle.url, handle.role, handle.worker_id, self.model)
        except (RuntimeError, ConnectorError) as exc:
            if managed.state == "cancelled":
                return  # stopped on purpose while it started
            logger.error("planner: worker %s did not come up: %s", handle.worker_id, exc)
            self._forget(managed)
            self.supervisor.stop_worker(handle, timeout_s=10.0)
            return
        with self._lock:
            managed.state = "ready"
            lead = self.clock() - managed.ordered_s
            self._lead_times.setdefault(handle.role, []).append(lead)
        self.events.append(("ready", handle.role, handle.worker_id))
        logger.info("planner: worker %s (%s) serving after %.1f s", handle.worker_id, handle.role,
                    lead)  # fmt: skip

    def _cancel(self, managed: _Managed) -> None:
        with self._lock:
            managed.state = "cancelled"
        self._forget(managed)
        self.events.append(("cancel", managed.handle.role, managed.handle.worker_id))
        self._thread(self.supervisor.stop_worker, managed.handle, 10.0)

    # -- down ----------------------------------------------------------------------------------

    def _drain_candidates(self, role: Role) -> list[_Managed]:
        """Ready workers of ``role``, fewest streams first (the newest among equals)."""
        try:
            active = {w["worker_id"]: int(w.get("active_requests", 0))
                      for w in self.frontend.workers()}  # fmt: skip
        except ConnectorError as exc:
            logger.warning("planner: worker list unavailable (%s); draining the newest", exc)
            active = {}
        with self._lock:
            ready = [m for m in self._workers.values()
                     if m.handle.role == role and m.state == "ready"]  # fmt: skip
        return sorted(ready, key=lambda m: (active.get(m.handle.worker_id, 0), -m.ordered_s))

    def _drain(self, managed: _Managed) -> None:
        handle = managed.handle
        try:
            self.frontend.drain(handle.worker_id)
        except ConnectorError as exc:
            logger.error("planner: cannot drain %s: %s", handle.worker_id, exc)
            return
        with self._lock:
            managed.state = "draining"
        self.events.append(("drain", handle.role, handle.worker_id))
        self._thread(self._finish_drain, managed)

    def _finish_drain(self, managed: _Managed) -> None:
        handle = managed.handle
        deadline = self.clock() + self.drain_config.deadline_s
        while True:
            try:
                active = self.frontend.active_requests(handle.worker_id)
            except ConnectorError as exc:
                logger.warning("planner: drain of %s: %s", handle.worker_id, exc)
                active = 1
            if not active:
                break
            if self.clock() >= deadline:
                logger.warning("planner: %s still streams %d request(s) at the drain deadline;"
                               " stopping it (its streams finish or migrate)",
                               handle.worker_id, active)  # fmt: skip
                break
            time.sleep(self.drain_config.poll_s)
        self.supervisor.stop_worker(handle, timeout_s=60.0)
        try:
            self.frontend.deregister(handle.worker_id)
        except ConnectorError as exc:
            logger.warning("planner: deregistering %s: %s", handle.worker_id, exc)
        self._forget(managed)
        self.events.append(("stopped", handle.role, handle.worker_id))
        logger.info("planner: worker %s drained and stopped", handle.worker_id)

    # -- helpers -------------------------------------------------------------------------------

    def _forget(self, managed: _Managed) -> None:
        with self._lock:
            self._workers.pop(managed.handle.worker_id, None)

    def _thread(self, target: Callable[..., Any], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"planner-{target.__name__}")  # fmt: skip
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every start, cancel and drain in flight has finished."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._threads):
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Nothing to wait for: at shutdown ``strata serve`` stops every worker itself."""
