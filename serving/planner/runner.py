"""The planner's I/O shell: every ``interval_s``, observe (metrics source and connector), run the
pure core's ``tick``, apply the decision through the connector (unless advisory), and export
``strata_planner_*``. Used by ``strata planner`` (alone, in a cluster) and by ``strata serve
--planner`` (a thread next to the frontend).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from serving.planner.capacity import CapacityModel
from serving.planner.config import PlannerConfig
from serving.planner.connectors.base import Connector, ConnectorError
from serving.planner.core import PlannerState, make_state, tick
from serving.planner.lead_time import initial_lead_times
from serving.planner.metrics import PlannerMetrics
from serving.planner.metrics_source import MetricsSample, RoleStats
from serving.planner.profile import load_profile
from serving.planner.types import Decision, Observation, RoleObservation

logger = logging.getLogger(__name__)


class MetricsSource(Protocol):
    def sample(self, now_s: float) -> MetricsSample: ...

    def close(self) -> None: ...


class PlannerRunner:
    """Owns the loop, the connector and the source; the decisions are the core's."""

    def __init__(
        self,
        config: PlannerConfig,
        state: PlannerState,
        connector: Connector,
        source: MetricsSource,
        metrics: PlannerMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.state = state
        self.connector = connector
        self.source = source
        self.metrics = metrics
        self.clock = clock
        self.decisions: list[Decision] = []  # the last few, for tests and /debug
        self._last_s: float | None = None
        self._holding = False

    def run_once(self) -> Decision | None:
        now = self.clock()
        try:
            counts = self.connector.replica_counts()
        except ConnectorError as exc:
            logger.error("planner: cannot read the replicas (%s); tick skipped", exc)
            return None
        sample = self.source.sample(now)
        roles = {}
        for role in self.config.roles:
            c = counts.get(role)
            stats = sample.roles.get(role, RoleStats())
            roles[role] = RoleObservation(
                ready=c.ready if c else 0,
                starting=c.starting if c else 0,
                draining=c.draining if c else 0,
                num_waiting=stats.num_waiting,
                num_running=stats.num_running,
                kv_usage=stats.kv_usage,
                lead_times_s=c.lead_times_s if c else (),
            )
        decision = tick(Observation(now, roles, sample.traffic, sample.error), self.state)
        self._apply(decision)
        elapsed = now - self._last_s if self._last_s is not None else 0.0
        self._last_s = now
        self.metrics.record(
            decision,
            {r: (o.ready, o.starting, o.draining) for r, o in roles.items()},
            config=self.config,
            elapsed_s=elapsed,
            output_tokens_rate=sample.traffic.output_tokens_rate if sample.traffic else None,
        )
        self.decisions = [*self.decisions[-99:], decision]
        return decision

    def _apply(self, decision: Decision) -> None:
        if decision.holding != self._holding:
            log = logger.warning if decision.holding else logger.info
            log("planner: %s", decision.summary() if decision.holding else "metrics are back")
            self._holding = decision.holding
        for change in decision.changes():
            if self.config.mode == "advisory":
                logger.info("planner (advisory, not applied): %s %d -> %d: %s", change.role,
                            change.current, change.target, change.reason)  # fmt: skip
                continue
            logger.info("planner: %s %d -> %d: %s", change.role, change.current, change.target,
                        change.reason)  # fmt: skip
            try:
                self.connector.set_replicas(change.role, change.target)
            except ConnectorError as exc:
                logger.error("planner: %s not scaled to %d: %s", change.role, change.target, exc)

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set (the first tick at once)."""
        interval = self.config.scaling.interval_s
        while True:
            try:
                self.run_once()
            except Exception:  # one bad tick must not end the loop (metrics, connector)
                logger.exception("planner: tick failed")
            if stop.wait(interval):
                return

    def close(self) -> None:
        self.connector.close()
        self.source.close()


def build_state(config: PlannerConfig) -> PlannerState:
    """Profile, capacity model and lead times (MLflow when configured) -> a fresh state."""
    profile = load_profile(config.profile)
    capacity = CapacityModel(
        profile,
        config.sla,
        target_utilization=config.scaling.target_utilization,
        kv_transfer_s=config.kv_transfer_s,
    )
    return make_state(config, capacity, initial_lead_times(config))
