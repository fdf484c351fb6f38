"""The recording fake API server of ``tests/workflows/fake_kube_api.py``, extended with what the
planner's Kubernetes connector calls: a Deployment's ``scale`` subresource and Pods (list, and
patch of their metadata), plus the ReplicaSet controller's part: pods follow ``spec.replicas``,
and on scale-down the pod with the lowest ``controller.kubernetes.io/pod-deletion-cost`` goes
first (then pods that are not ready, then the newest), as Kubernetes does.

Like the base server it enforces what a real API server would: the patch content types
(a JSON merge or strategic merge patch is an object, a JSON patch a list of operations; other
types get 415), ``spec.replicas`` a non-negative integer (else 422 Invalid), names and
namespaces from the URL.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.workflows.fake_kube_api import FakeKubeAPI, Recorded, _status

SCALE_PATH = re.compile(
    r"^/apis/apps/v1/namespaces/(?P<ns>[a-z0-9-]+)/deployments/(?P<name>[a-z0-9.-]+)/scale$"
)
POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[a-z0-9-]+)/pods(?:/(?P<name>[a-z0-9.-]+))?$")
MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
JSON_PATCH = "application/json-patch+json"
_SCALE_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")


@dataclass
class ScalingFakeKubeAPI(FakeKubeAPI):
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    deleted_pods: list[str] = field(default_factory=list)
    _ips: itertools.count = field(default_factory=lambda: itertools.count(10))
    _clock: itertools.count = field(default_factory=lambda: itertools.count(0))

    # --- seeding ------------------------------------------------------------------------------

    def add_deployment(self, namespace: str, name: str, role: str, replicas: int) -> None:
        labels = {"app.kubernetes.io/component": "worker", "strata.dev/role": role,
                  "app.kubernetes.io/name": name}  # fmt: skip
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": name, **labels}},
                    "spec": {"containers": [{"name": "worker", "image": "strata:1"}]},
                },
            },
        }
        with self._lock:
            self._store("Deployment", ("deployments", namespace, name), body, "Apply", "helm")
            self._reconcile_pods(namespace, name)

    def pods_of(self, name: str) -> list[dict[str, Any]]:
        return [
            p for (_, _), p in sorted(self.pods.items()) if p["metadata"]["name"].startswith(name)
        ]

    # --- the API ------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        scale, pod = SCALE_PATH.match(url.path), POD_PATH.match(url.path)
        if scale is None and pod is None:
            return super().handle(method, raw_path, headers, raw)
        query = parse_qs(url.query)
        content_type = headers.get("Content-Type")
        body = yaml.safe_load(raw) if raw else None
        with self._lock:
            self.requests.append(Recorded(method, url.path, query, content_type, body))
            if scale is not None:
                return self._scale(method, scale["ns"], scale["name"], content_type, body)
            return self._pod(method, pod["ns"], pod["name"], query, content_type, body)

    def _scale(self, method: str, ns: str, name: str, content_type: Any, body: Any):
        deployment = self.objects.get(("deployments", ns, name))
        if deployment is None:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        if method == "PATCH":
            replicas = _patched_replicas(content_type, body, deployment["spec"]["replicas"])
            if isinstance(replicas, tuple):
                return replicas
            if replicas != deployment["spec"]["replicas"]:
                deployment["spec"]["replicas"] = replicas
                deployment["metadata"]["generation"] += 1
                deployment["metadata"]["resourceVersion"] = str(next(self._versions))
            self._reconcile_pods(ns, name)
        elif method != "GET":
            return _status(405, "MethodNotAllowed", f"{method} on scale is not served here")
        meta = deployment["metadata"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        return 200, {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in _SCALE_META},
            "spec": {"replicas": deployment["spec"]["replicas"]},
            "status": {
                "replicas": deployment["status"].get("replicas", 0),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items())),
            },
        }

    def _pod(self, method: str, ns: str, name: str | None, query: dict, content_type, body):
        if name is None:
            if method != "GET":
                return _status(405, "MethodNotAllowed", f"{method} on pods is not served here")
            wanted = dict(t.partition("=")[::2] for t in
                          filter(None, query.get("labelSelector", [""])[0].split(",")))  # fmt: skip
            items = [copy.deepcopy(p) for (pns, _), p in sorted(self.pods.items())
                     if pns == ns and all(p["metadata"]["labels"].get(k) == v
                                          for k, v in wanted.items())]  # fmt: skip
            meta = {"resourceVersion": str(next(self._versions))}
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}
        pod = self.pods.get((ns, name))
        if pod is None:
            return _status(404, "NotFound", f'pods "{name}" not found')
        if method == "GET":
            return 200, pod
        if method != "PATCH":
            return _status(405, "MethodNotAllowed", f"{method} on a pod is not served here")
        if content_type not in MERGE_TYPES or not isinstance(body, dict):
            return _status(415, "UnsupportedMediaType", f"{content_type} with {type(body)}")
        if set(body) - {"metadata"} or set(body.get("metadata", {})) - {"annotations", "labels"}:
            return _status(422, "Invalid", "only metadata.annotations/labels are patched here")
        for key in ("annotations", "labels"):
            for k, v in (body["metadata"].get(key) or {}).items():
                if not isinstance(v, str):
                    return _status(400, "BadRequest", f"{key}.{k} must be a string")
                pod["metadata"].setdefault(key, {})[k] = v
        pod["metadata"]["resourceVersion"] = str(next(self._versions))
        return 200, pod

    # --- the ReplicaSet controller ------------------------------------------------------------

    def _reconcile_pods(self, ns: str, name: str) -> None:
        deployment = self.objects[("deployments", ns, name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [
            k
            for k, p in self.pods.items()
            if k[0] == ns and p["metadata"]["name"].startswith(f"{name}-")
        ]
        wanted = deployment["spec"]["replicas"]
        while len(mine) < wanted:
            key = (ns, f"{name}-{uuid.uuid4().hex[:5]}")
            created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=next(self._clock))
            self.pods[key] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": key[1], "namespace": ns, "uid": str(uuid.uuid4()),
                             "labels": dict(labels), "annotations": {},
                             "resourceVersion": str(next(self._versions)),
                             "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
                "spec": {"containers": [{"name": "worker", "image": "strata:1"}]},
                "status": {"phase": "Running", "podIP": f"10.0.0.{next(self._ips)}",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }  # fmt: skip
            mine.append(key)
        if len(mine) > wanted:

            def order(key: tuple[str, str]) -> tuple[int, int, str]:
                meta = self.pods[key]["metadata"]
                cost = int(meta["annotations"].get("controller.kubernetes.io/pod-deletion-cost", 0))
                return cost, 1, meta["creationTimestamp"]

            for key in sorted(mine, key=order)[: len(mine) - wanted]:
                self.deleted_pods.append(self.pods.pop(key)["metadata"]["name"])
        ready = sum(1 for k in self.pods if k[0] == ns and k[1].startswith(f"{name}-"))
        deployment["status"] = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": ready,
            "updatedReplicas": ready,
            "readyReplicas": ready,
            "availableReplicas": ready,
        }


def _patched_replicas(content_type: Any, body: Any, current: int) -> int | tuple[int, Any]:
    """The replicas a patch asks for, or the (status, Status) a real server would answer."""
    if content_type in MERGE_TYPES:
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "a merge patch must be a JSON object")
        replicas = (body.get("spec") or {}).get("replicas", current)
    elif content_type == JSON_PATCH:
        if not isinstance(body, list):
            return _status(400, "BadRequest", "a JSON patch must be a list of operations")
        replicas = current
        for op in body:
            if op.get("op") != "replace" or op.get("path") != "/spec/replicas":
                return _status(422, "Invalid", f"unsupported operation {json.dumps(op)}")
            replicas = op.get("value")
    else:
        return _status(415, "UnsupportedMediaType", f"the body of type {content_type}")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        return _status(422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}")
    return replicas
