"""The virtual connector: replicas of a simulated cluster (``strata bench replay``'s).

The simulator implements ``VirtualCluster``; this connector applies the planner's targets to it
in the order every connector uses (``base.scale_down_plan``): a scale-up provisions replicas
that serve one lead time later, a scale-down cancels starting replicas, then drains ready ones.
"""

from __future__ import annotations

from typing import Protocol

from serving.planner.config import Role
from serving.planner.connectors.base import Connector, ReplicaCounts, scale_down_plan


class VirtualCluster(Protocol):
    def counts(self, role: Role) -> ReplicaCounts: ...

    def provision(self, role: Role) -> None:
        """Order one replica; it serves after the cluster's lead time."""

    def cancel_starting(self, role: Role) -> bool:
        """Drop one replica that is not serving yet; False if there is none."""

    def drain_one(self, role: Role) -> bool:
        """Drain the least busy serving replica; False if there is none."""


class VirtualConnector(Connector):
    name = "virtual"

    def __init__(self, cluster: VirtualCluster, roles: tuple[Role, ...]) -> None:
        self.cluster = cluster
        self.roles = roles

    def replica_counts(self) -> dict[Role, ReplicaCounts]:
        return {role: self.cluster.counts(role) for role in self.roles}

    def set_replicas(self, role: Role, target: int) -> None:
        counts = self.cluster.counts(role)
        for _ in range(max(target - counts.current, 0)):
            self.cluster.provision(role)
        cancel, drain = scale_down_plan(target, counts.ready, counts.starting)
        for _ in range(cancel):
            self.cluster.cancel_starting(role)
        for _ in range(drain):
            self.cluster.drain_one(role)
