"""The planner core's inputs and outputs: plain, immutable values.

``Observation`` is what the shell measured at one tick (traffic from the metrics source, replica
counts from the connector); ``Decision`` is what the core wants, per role, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from serving.planner.config import Role


@dataclass(frozen=True, slots=True)
class Load:
    """Requests per second of a shape: mean prompt and output tokens."""

    request_rate: float
    input_tokens: float
    output_tokens: float


@dataclass(frozen=True, slots=True)
class Traffic:
    """Client traffic over the metrics window (the frontend's view)."""

    window_s: float
    # Requests arriving per second: the demand (finished + the growth of those in flight), not
    # the throughput, which a short pool caps at its capacity.
    request_rate: float
    num_requests: float  # requests finished in the window
    input_tokens: float | None = None  # mean per request; None without requests
    output_tokens: float | None = None
    output_tokens_rate: float = 0.0  # output tokens per second
    ttft_mean_s: float | None = None
    ttft_p90_s: float | None = None
    itl_mean_s: float | None = None
    itl_p90_s: float | None = None


@dataclass(frozen=True, slots=True)
class RoleObservation:
    """One role's replicas, from the connector, and its workers' queues, from the metrics."""

    ready: int  # serving
    starting: int = 0  # asked for, not serving yet
    draining: int = 0  # leaving: no new requests, finishing what they have
    num_waiting: float = 0.0  # queued requests over the role's workers
    num_running: float = 0.0
    kv_usage: float | None = None  # mean over the role's workers, 0..1
    # Scale-ups of this role that became ready since the last tick: decision-to-serving seconds.
    lead_times_s: tuple[float, ...] = ()

    @property
    def current(self) -> int:
        """Replicas that count: serving or on their way (draining ones are leaving)."""
        return self.ready + self.starting


@dataclass(frozen=True, slots=True)
class Observation:
    time_s: float
    roles: Mapping[Role, RoleObservation]
    traffic: Traffic | None  # None: the metrics source failed (``error`` says how)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RoleDecision:
    role: Role
    current: int
    target: int
    reason: str
    lead_time_s: float
    replica_rate: float | None = None  # requests/s one replica sustains (model), if computed

    @property
    def direction(self) -> str | None:
        if self.target > self.current:
            return "up"
        if self.target < self.current:
            return "down"
        return None


@dataclass(frozen=True, slots=True)
class Decision:
    time_s: float
    roles: dict[Role, RoleDecision]
    observed: Load | None
    predicted: Load | None
    holding: bool = False  # metrics unavailable: sizes held
    corrections: dict[str, float] = field(default_factory=dict)
    cost_usd_per_hour: float = 0.0  # at the target sizes

    def changes(self) -> list[RoleDecision]:
        return [d for d in self.roles.values() if d.direction is not None]

    def summary(self) -> str:
        parts = [f"{d.role} {d.current}->{d.target}: {d.reason}" for d in self.roles.values()]
        return "; ".join(parts)
