"""The connector interface and the scale-down order every connector follows.

``replica_counts()`` reports, per role, what serves, what is starting and what is draining,
plus the measured lead times of scale-ups that completed since the last call.
``set_replicas(role, target)`` moves a role toward ``target``: up by starting replicas; down by
cancelling replicas that are still starting first (they serve nothing yet), then draining the
ready replicas with the fewest requests in flight: they stop receiving new requests, finish
(or, past the drain deadline, migrate) what they have, and only then stop. No request is lost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from serving.planner.config import Role


@dataclass(frozen=True, slots=True)
class ReplicaCounts:
    ready: int = 0
    starting: int = 0
    draining: int = 0
    lead_times_s: tuple[float, ...] = ()  # scale-ups that became ready since the last call

    @property
    def current(self) -> int:
        return self.ready + self.starting


class ConnectorError(RuntimeError):
    """The connector could not read or change the replicas; the message says where."""


class Connector(ABC):
    name = "connector"

    @abstractmethod
    def replica_counts(self) -> dict[Role, ReplicaCounts]: ...

    @abstractmethod
    def set_replicas(self, role: Role, target: int) -> None: ...

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Stop background work (drains in flight finish on their own deadline)."""


def scale_down_plan(target: int, ready: int, starting: int) -> tuple[int, int]:
    """(starting replicas to cancel, ready replicas to drain) to reach ``target``."""
    excess = max(ready + starting - target, 0)
    cancel = min(excess, starting)
    return cancel, excess - cancel
