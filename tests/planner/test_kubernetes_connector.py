"""Acceptance 4: the Kubernetes connector's calls for a scale-up and a drain-then-scale-down are
exactly those a real API server expects for a Deployment's scale subresource (recorded by the
fake API server of ``tests/workflows``, extended with ``scale`` and Pods), and the drained pod
is the one the ReplicaSet removes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serving.planner.config import DrainConfig, KubernetesConfig
from serving.planner.connectors.base import ConnectorError
from serving.planner.connectors.frontend_admin import FrontendAdmin
from serving.planner.connectors.kubernetes import KubernetesConnector, make_api_client
from tests.planner.fake_kube_scale import ScalingFakeKubeAPI
from tests.workflows.fake_kube_api import write_kubeconfig

pytest.importorskip("kubernetes.client", reason="the official kubernetes client")

NS = "team-a"
ADMIN_KEY = "admin-secret"
DEPLOYMENTS = "/apis/apps/v1/namespaces/team-a/deployments"
DECODE_SELECTOR = "app.kubernetes.io/component=worker,strata.dev/role=decode"


@dataclass
class FrontendStub:
    """The frontend's admin API as the connector uses it; records calls and checks the key.
    A drained worker reports ``busy_polls`` more reads with a request in flight, then none."""

    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    busy_polls: int = 2
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                stub.calls.append((method, self.path))
                if self.headers.get("Authorization") != f"Bearer {ADMIN_KEY}":
                    return self._reply(401, {"error": {"message": "admin key required"}})
                if method == "GET" and self.path == "/admin/workers":
                    return self._reply(200, {"workers": stub.listing()})
                parts = self.path.strip("/").split("/")
                if (
                    method == "POST"
                    and parts[:2] == ["admin", "workers"]
                    and parts[3:] == ["drain"]
                ):
                    worker = stub.workers.get(parts[2])
                    if worker is None:
                        return self._reply(404, {"error": {"message": "no such worker"}})
                    worker["draining"] = True
                    active = worker["active_requests"]
                    answer = {"worker_id": parts[2], "draining": True, "active_requests": active}
                    return self._reply(200, answer)
                return self._reply(404, {"error": {"message": self.path}})

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def listing(self) -> list[dict[str, Any]]:
        for worker in self.workers.values():
            if worker["draining"] and worker["active_requests"]:
                if self.busy_polls <= 0:
                    worker["active_requests"] = 0
                self.busy_polls -= 1
        return [dict(w) for w in self.workers.values()]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def cluster(
    tmp_path: Path,
) -> Iterator[tuple[ScalingFakeKubeAPI, FrontendStub, KubernetesConnector]]:
    fake = ScalingFakeKubeAPI()
    server = fake.start()
    fake.add_deployment(NS, "strata-decode", "decode", 2)
    fake.add_deployment(NS, "strata-prefill", "prefill", 1)
    frontend = FrontendStub()
    frontend.start()
    for i, pod in enumerate(fake.pods.values()):
        ip = pod["status"]["podIP"]
        role = pod["metadata"]["labels"]["strata.dev/role"]
        frontend.workers[f"w{i}"] = {
            "worker_id": f"w{i}", "url": f"http://{ip}:8000", "role": role, "healthy": True,
            "draining": False, "active_requests": 0,
        }  # fmt: skip
    config = KubernetesConfig(
        namespace=NS, in_cluster=False, kubeconfig=write_kubeconfig(tmp_path, server)
    )
    connector = KubernetesConnector(
        config,
        ("prefill", "decode"),
        drain=DrainConfig(deadline_s=30, poll_s=0.02),
        frontend=FrontendAdmin(frontend.url, ADMIN_KEY),
        api_client=make_api_client(config),
    )
    fake.requests.clear()
    yield fake, frontend, connector
    frontend.stop()
    fake.stop()


def test_scale_up_patches_the_scale_subresource(cluster) -> None:  # type: ignore[no-untyped-def]
    fake, _, connector = cluster
    counts = connector.replica_counts()
    assert (counts["decode"].ready, counts["prefill"].ready) == (2, 1)
    fake.requests.clear()
    connector.set_replicas("decode", 4)
    calls = [(r.method, r.path, r.query, r.content_type, r.body) for r in fake.requests]
    assert calls == [
        ("GET", DEPLOYMENTS, {"labelSelector": [DECODE_SELECTOR]}, None, None),
        ("GET", f"{DEPLOYMENTS}/strata-decode/scale", {}, None, None),
        ("PATCH", f"{DEPLOYMENTS}/strata-decode/scale", {}, "application/merge-patch+json",
         {"spec": {"replicas": 4}}),
    ]  # fmt: skip
    assert len(fake.pods_of("strata-decode")) == 4
    # The new pods serve: their lead time is measured from the order.
    counts = connector.replica_counts()["decode"]
    assert (counts.ready, counts.starting) == (4, 0)
    assert len(counts.lead_times_s) == 2 and all(t >= 0 for t in counts.lead_times_s)


def test_drain_then_scale_down(cluster) -> None:  # type: ignore[no-untyped-def]
    fake, frontend, connector = cluster
    pods = fake.pods_of("strata-decode")
    by_ip = {w["url"].split("//")[1].split(":")[0]: w for w in frontend.workers.values()}
    # The older pod is busy; the newer one has one stream left: it is the one to drain.
    busy, idle = (by_ip[p["status"]["podIP"]] for p in pods)
    busy["active_requests"], idle["active_requests"] = 5, 1
    victim = next(p["metadata"]["name"] for p in pods
                  if by_ip[p["status"]["podIP"]] is idle)  # fmt: skip
    connector.set_replicas("decode", 1)
    assert connector.replica_counts()["decode"].draining in (0, 1)
    assert connector.wait_for_drains(timeout_s=20)
    calls = [(r.method, r.path, r.query, r.content_type, r.body) for r in fake.requests]
    selector = {"labelSelector": ["app.kubernetes.io/name=strata-decode"]}
    annotation = {
        "metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-1000"}}
    }
    scale_down = [
        ("GET", f"{DEPLOYMENTS}/strata-decode/scale", {}, None, None),
        ("PATCH", f"{DEPLOYMENTS}/strata-decode/scale", {}, "application/merge-patch+json",
         {"spec": {"replicas": 1}}),
    ]  # fmt: skip
    api_calls = [c for c in calls if c[1] != DEPLOYMENTS]  # drop the tick's reads
    assert api_calls == [
        ("GET", "/api/v1/namespaces/team-a/pods", selector, None, None),
        ("PATCH", f"/api/v1/namespaces/team-a/pods/{victim}", {},
         "application/strategic-merge-patch+json", annotation),
        *scale_down,
    ]  # fmt: skip
    # The frontend stopped routing to the pod before Kubernetes was told anything, and the
    # scale went down only after its last stream ended.
    drain_call = ("POST", f"/admin/workers/{idle['worker_id']}/drain")
    assert drain_call in frontend.calls
    assert idle["active_requests"] == 0 and frontend.busy_polls < 0
    assert fake.deleted_pods == [victim]
    assert [p["metadata"]["name"] for p in fake.pods_of("strata-decode")] != [victim]
    counts = connector.replica_counts()["decode"]
    assert (counts.ready, counts.starting, counts.draining) == (1, 0, 0)


def test_cancelling_starting_replicas_scales_without_a_drain(cluster) -> None:  # type: ignore[no-untyped-def]
    fake, frontend, connector = cluster
    for pod in fake.pods_of("strata-decode"):  # both pods not ready yet (still starting)
        pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    deployment = fake.objects[("deployments", NS, "strata-decode")]
    deployment["status"]["readyReplicas"] = 0
    connector.set_replicas("decode", 1)
    assert [(r.method, r.path, r.body) for r in fake.requests][-1] == (
        "PATCH", f"{DEPLOYMENTS}/strata-decode/scale", {"spec": {"replicas": 1}}
    )  # fmt: skip
    assert not any(path.endswith("/drain") for _, path in frontend.calls)


def test_missing_or_ambiguous_deployments_are_named_errors(cluster) -> None:  # type: ignore[no-untyped-def]
    fake, _, connector = cluster
    with pytest.raises(
        ConnectorError, match=r"strata.dev/role=both in namespace team-a, found none"
    ):
        connector.deployment("both")
    fake.add_deployment(NS, "strata-decode-b", "decode", 1)
    with pytest.raises(ConnectorError, match=r"found \['strata-decode', 'strata-decode-b'\]"):
        connector.replica_counts()
