"""The Kubernetes connector: each role is one worker Deployment, sized through its ``scale``
subresource with the official client, so that HPA, KEDA and Karpenter can coexist.

Deployments are found by labels: ``app.kubernetes.io/component=worker`` and
``strata.dev/role=prefill|decode|both`` (plus ``extra_selector``, e.g. the model); exactly one
per role. Calls (``docs/planner.md`` lists the RBAC they need):

* read: ``GET /apis/apps/v1/namespaces/{ns}/deployments?labelSelector=...``;
* scale up (or cancel replicas still starting): ``PATCH .../deployments/{name}/scale`` with
  ``{"spec": {"replicas": N}}`` as a JSON merge patch;
* drain, then scale down: pick the ready pod with the fewest requests in flight
  (``GET /api/v1/namespaces/{ns}/pods?labelSelector=<the Deployment's selector>``, the
  frontend's ``/admin/workers``), ask the frontend to stop routing to it
  (``POST /admin/workers/{id}/drain``), mark it ``controller.kubernetes.io/pod-deletion-cost:
  "-1000"`` (``PATCH /api/v1/namespaces/{ns}/pods/{name}``, a strategic merge patch) so that
  the ReplicaSet removes that pod and no other, wait until its streams end (or the drain
  deadline: then the pod's SIGTERM grace finishes them or the frontend migrates them), then
  ``GET`` and ``PATCH`` the scale to one less. The drain runs in a thread; the planner keeps
  ticking and counts the pod as draining.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from serving.planner.config import DrainConfig, KubernetesConfig, Role
from serving.planner.connectors.base import (
    Connector,
    ConnectorError,
    ReplicaCounts,
    scale_down_plan,
)
from serving.planner.connectors.frontend_admin import FrontendAdmin

logger = logging.getLogger(__name__)

COMPONENT_SELECTOR = "app.kubernetes.io/component=worker"
ROLE_LABEL = "strata.dev/role"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


@dataclass
class _Drain:
    role: Role
    pod: str
    worker_id: str | None
    started_s: float


def make_api_client(config: KubernetesConfig) -> Any:
    """The pod's service account in a cluster (``in_cluster``), else the kubeconfig."""
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if config.in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(
                config_file=str(config.kubeconfig) if config.kubeconfig else None,
                context=config.context,
                client_configuration=configuration,
            )
    except (kube_config.ConfigException, OSError) as exc:
        where = "the pod's service account" if config.in_cluster else "the kubeconfig"
        raise ConnectorError(f"no Kubernetes credentials from {where}: {exc}") from exc
    return client.ApiClient(configuration)


class KubernetesConnector(Connector):
    name = "kubernetes"

    def __init__(
        self,
        config: KubernetesConfig,
        roles: tuple[Role, ...],
        *,
        drain: DrainConfig,
        frontend: FrontendAdmin | None,
        api_client: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        api_client = api_client or make_api_client(config)
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = config.namespace
        self.extra_selector = config.extra_selector
        self.roles = roles
        self.drain_config = drain
        self.frontend = frontend
        self.clock = clock
        self._lock = threading.Lock()  # scale read-modify-writes and the drain table
        self._drains: dict[str, _Drain] = {}
        self._threads: list[threading.Thread] = []
        self._orders: dict[Role, deque[float]] = {role: deque() for role in roles}
        self._last_ready: dict[Role, int] = {}

    # -- reading -------------------------------------------------------------------------------

    def selector(self, role: Role) -> str:
        parts = [COMPONENT_SELECTOR, f"{ROLE_LABEL}={role}"]
        if self.extra_selector:
            parts.append(self.extra_selector)
        return ",".join(parts)

    def deployment(self, role: Role) -> Any:
        from kubernetes.client.exceptions import ApiException

        selector = self.selector(role)
        try:
            found = self.apps.list_namespaced_deployment(self.namespace, label_selector=selector)
        except (ApiException, OSError) as exc:
            raise ConnectorError(
                f"listing Deployments {selector} in {self.namespace}: {exc}"
            ) from exc
        if len(found.items) != 1:
            names = [d.metadata.name for d in found.items] or "none"
            raise ConnectorError(
                f"expected one Deployment labelled {selector} in namespace {self.namespace}, "
                f"found {names}"
            )
        return found.items[0]

    def replica_counts(self) -> dict[Role, ReplicaCounts]:
        return {role: self._counts(role, self.deployment(role)) for role in self.roles}

    def _counts(self, role: Role, deployment: Any) -> ReplicaCounts:
        spec = deployment.spec.replicas or 0
        ready_pods = (deployment.status.ready_replicas or 0) if deployment.status else 0
        with self._lock:
            draining = sum(1 for d in self._drains.values() if d.role == role)
        return ReplicaCounts(
            ready=max(min(ready_pods, spec) - draining, 0),
            starting=max(spec - ready_pods, 0),
            draining=draining,
            lead_times_s=self._lead_times(role, ready_pods),
        )

    def _lead_times(self, role: Role, ready_pods: int) -> tuple[float, ...]:
        """Pods that became ready since the last look close the oldest open scale-ups."""
        previous = self._last_ready.get(role)
        self._last_ready[role] = ready_pods
        orders = self._orders[role]
        if previous is None or ready_pods <= previous:
            return ()
        now = self.clock()
        return tuple(now - orders.popleft() for _ in range(min(ready_pods - previous, len(orders))))

    # -- changing ------------------------------------------------------------------------------

    def set_replicas(self, role: Role, target: int) -> None:
        deployment = self.deployment(role)
        counts = self._counts(role, deployment)
        name = deployment.metadata.name
        if target > counts.current:
            added = target - counts.current
            self._patch_scale(name, delta=added)
            now = self.clock()
            self._orders[role].extend([now] * added)
            logger.info("planner: %s %s +%d (scale-up ordered)", role, name, added)
            return
        cancel, drain = scale_down_plan(target, counts.ready, counts.starting)
        if cancel:
            # The ReplicaSet removes pods that are not ready before ready ones.
            self._patch_scale(name, delta=-cancel)
            for _ in range(min(cancel, len(self._orders[role]))):
                self._orders[role].pop()
            logger.info("planner: %s %s -%d starting replica(s) cancelled", role, name, cancel)
        for _ in range(drain):
            self._start_drain(role, deployment)

    def _patch_scale(self, name: str, *, delta: int) -> int:
        """Read the scale and patch it by ``delta`` under the lock; returns the new size."""
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            try:
                scale = self.apps.read_namespaced_deployment_scale(name, self.namespace)
                replicas = max((scale.spec.replicas or 0) + delta, 0)
                self.apps.patch_namespaced_deployment_scale(
                    name,
                    self.namespace,
                    {"spec": {"replicas": replicas}},
                    _content_type=MERGE_PATCH,
                )
            except (ApiException, OSError) as exc:
                raise ConnectorError(f"scaling Deployment {self.namespace}/{name}: {exc}") from exc
        return replicas

    # -- drains --------------------------------------------------------------------------------

    def _start_drain(self, role: Role, deployment: Any) -> None:
        name = deployment.metadata.name
        pod, worker_id = self._pick_pod(deployment)
        drain = _Drain(role, pod, worker_id, self.clock())
        with self._lock:
            self._drains[pod] = drain
        if worker_id is not None and self.frontend is not None:
            self.frontend.drain(worker_id)
        self._mark_for_deletion(pod)
        logger.info("planner: %s draining pod %s (worker %s)", role, pod, worker_id or "?")
        thread = threading.Thread(
            target=self._finish_drain, args=(drain, name), name=f"drain-{pod}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _pick_pod(self, deployment: Any) -> tuple[str, str | None]:
        """The ready pod with the fewest requests in flight (the newest among equals)."""
        from kubernetes.client.exceptions import ApiException

        name = deployment.metadata.name
        labels = deployment.spec.selector.match_labels or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        except (ApiException, OSError) as exc:
            raise ConnectorError(f"listing pods of {name}: {exc}") from exc
        with self._lock:
            taken = set(self._drains)
        candidates = [p for p in pods if _is_ready(p) and p.metadata.name not in taken]
        if not candidates:
            raise ConnectorError(f"no ready pod of Deployment {name} left to drain")
        workers = {}
        if self.frontend is not None:
            workers = {urlsplit(w["url"]).hostname: w for w in self.frontend.workers()}

        def key(pod: Any) -> tuple[int, float]:
            worker = workers.get(pod.status.pod_ip)
            active = int(worker.get("active_requests", 0)) if worker else 0
            created = pod.metadata.creation_timestamp
            return active, -(created.timestamp() if created else 0.0)

        chosen = min(candidates, key=key)
        worker = workers.get(chosen.status.pod_ip)
        return chosen.metadata.name, worker["worker_id"] if worker else None

    def _mark_for_deletion(self, pod: str) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"annotations": {DELETION_COST: "-1000"}}}
        try:
            self.core.patch_namespaced_pod(
                pod, self.namespace, body, _content_type=STRATEGIC_MERGE_PATCH
            )
        except (ApiException, OSError) as exc:
            raise ConnectorError(f"annotating pod {pod}: {exc}") from exc

    def _finish_drain(self, drain: _Drain, name: str) -> None:
        deadline = drain.started_s + self.drain_config.deadline_s
        try:
            while drain.worker_id is not None and self.frontend is not None:
                active = self.frontend.active_requests(drain.worker_id)
                if not active:
                    break
                if self.clock() >= deadline:
                    logger.warning(
                        "planner: pod %s still streams %d request(s) at the drain deadline; "
                        "scaling down (SIGTERM grace, then migration)", drain.pod, active
                    )  # fmt: skip
                    break
                time.sleep(self.drain_config.poll_s)
            self._patch_scale(name, delta=-1)
            logger.info("planner: %s pod %s drained; %s scaled down", drain.role, drain.pod, name)
        except ConnectorError as exc:
            logger.error("planner: drain of pod %s failed: %s", drain.pod, exc)
        finally:
            with self._lock:
                self._drains.pop(drain.pod, None)

    def wait_for_drains(self, timeout_s: float) -> bool:
        """Test and shutdown helper: True when every drain thread has finished."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._threads):
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self._threads)


def _is_ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
