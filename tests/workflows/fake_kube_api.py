"""A recording fake of the Kubernetes API server: Deployments and Services, nothing else.

A real HTTP server (``http.server`` in a thread) that enforces what a real API server would for
the calls Strata makes: paths and methods, server-side apply's content type
(``application/apply-patch+yaml``) and required ``fieldManager``, and that the body's
apiVersion, kind, name and namespace match the URL. It answers with realistic objects (uid,
resourceVersion, generation, defaults, managedFields, a clusterIP) and Status errors, and plays
the Deployment controller: ``readyReplicas`` reaches ``spec.replicas`` after ``ready_after``
status reads of the current generation (or the rollout stalls, when ``stall`` is set).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

APPLY = "application/apply-patch+yaml"
# (group prefix, plural) -> (apiVersion, kind)
RESOURCES = {
    ("/apis/apps/v1", "deployments"): ("apps/v1", "Deployment"),
    ("/api/v1", "services"): ("v1", "Service"),
}
PATH = re.compile(
    r"^(?P<prefix>/apis/apps/v1|/api/v1)/namespaces/(?P<ns>[a-z0-9-]+)/(?P<plural>[a-z]+)"
    r"(?:/(?P<name>[a-z0-9.-]+)(?P<status>/status)?)?$"
)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


@dataclass
class FakeKubeAPI:
    ready_after: int = 3  # status reads of a generation before it is ready
    stall: bool = False  # the rollout exceeds its progress deadline instead
    requests: list[Recorded] = field(default_factory=list)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    _reads: dict[tuple[str, str], int] = field(default_factory=dict)
    _versions: itertools.count = field(default_factory=lambda: itertools.count(1000))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                status, payload = fake.handle(self.command, self.path, self.headers, self._body())
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    # --- the API -----------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        content_type = headers.get("Content-Type")
        body = yaml.safe_load(raw) if raw else None  # JSON is YAML: one parser for both
        with self._lock:
            self.requests.append(Recorded(method, url.path, query, content_type, body))
            match = PATH.match(url.path)
            if match is None or (match["prefix"], match["plural"]) not in RESOURCES:
                return _status(404, "NotFound", f"the server could not find {url.path}")
            api_version, kind = RESOURCES[(match["prefix"], match["plural"])]
            key = (match["plural"], match["ns"], match["name"] or "")
            if match["status"] and (kind != "Deployment" or method != "GET"):
                return _status(405, "MethodNotAllowed", f"{method} on status is not served here")
            if match["name"] is None:
                if method == "GET":
                    return 200, self._list(api_version, kind, key, query)
                if method == "POST":
                    return self._create(api_version, kind, key, content_type, body)
                return _status(405, "MethodNotAllowed", f"{method} on a collection")
            if method == "GET":
                return self._get(kind, key, bool(match["status"]))
            if method == "PATCH":
                return self._apply(api_version, kind, key, content_type, query, body)
            if method == "DELETE":
                return self._delete(kind, key)
            return _status(405, "MethodNotAllowed", f"{method} is not served here")

    def _list(self, api_version: str, kind: str, key: tuple, query: dict) -> dict[str, Any]:
        wanted = {}
        for term in filter(None, query.get("labelSelector", [""])[0].split(",")):
            label, _, value = term.partition("=")
            wanted[label] = value
        items = [
            obj
            for (plural, ns, _), obj in sorted(self.objects.items())
            if (plural, ns) == key[:2]
            and all(obj["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        ]
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "items": [{**obj} for obj in items],
        }

    def _create(self, api_version: str, kind: str, key: tuple, content_type: Any, body: Any):
        if content_type != "application/json":
            return _status(415, "UnsupportedMediaType", f"{content_type} for create")
        problem = _check_body(api_version, kind, key, body, name_required=True)
        if problem:
            return _status(400, "BadRequest", problem)
        key = (*key[:2], body["metadata"]["name"])
        if key in self.objects:
            return _status(409, "AlreadyExists", f'{key[0]} "{key[2]}" already exists')
        return 201, self._store(kind, key, body, "Update", None)

    def _get(self, kind: str, key: tuple, status: bool) -> tuple[int, Any]:
        obj = self.objects.get(key)
        if obj is None:
            return _status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        if kind == "Deployment" and status:
            self._reconcile(key, obj)
        return 200, obj

    def _apply(self, api_version, kind, key, content_type, query, body) -> tuple[int, Any]:
        if content_type != APPLY:
            return _status(415, "UnsupportedMediaType", f"only server-side apply: {content_type}")
        if not query.get("fieldManager"):
            return _status(422, "Invalid", "fieldManager is required for apply requests")
        if query.get("force", ["false"])[0] not in ("true", "false"):
            return _status(400, "BadRequest", "force must be true or false")
        problem = _check_body(api_version, kind, key, body, name_required=True)
        if problem:
            return _status(400, "BadRequest", problem)
        existing = self.objects.get(key)
        manager = query["fieldManager"][0]
        return (200 if existing else 201), self._store(kind, key, body, "Apply", manager)

    def _delete(self, kind: str, key: tuple) -> tuple[int, Any]:
        obj = self.objects.pop(key, None)
        if obj is None:
            return _status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        if kind == "Service":  # services answer with the deleted object
            return 200, obj
        details = {"name": key[2], "group": "apps", "kind": key[0], "uid": obj["metadata"]["uid"]}
        return 200, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    # --- objects and the controller ----------------------------------------------------------

    def _store(self, kind: str, key: tuple, body: dict, operation: str, manager: str | None):
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        existing = self.objects.get(key)
        meta = (
            dict(existing["metadata"])
            if existing
            else {"uid": str(uuid.uuid4()), "creationTimestamp": now, "generation": 0}
        )
        spec = json.loads(json.dumps(body.get("spec") or {}))
        if kind == "Deployment":
            for container in spec["template"]["spec"]["containers"]:
                for quantities in (container.get("resources") or {}).values():
                    quantities.update({k: str(v) for k, v in quantities.items()})  # canonical
            spec = {
                "replicas": 1,
                "revisionHistoryLimit": 10,
                "progressDeadlineSeconds": 600,
                **spec,
            }
            if existing is None or existing["spec"] != spec:
                meta["generation"] += 1
                self._reads[key[1:]] = 0
        else:
            meta.pop("generation", None)
            cluster_ip = existing["spec"]["clusterIP"] if existing else "10.100.23.7"
            spec = {
                **spec,
                "clusterIP": cluster_ip,
                "clusterIPs": [cluster_ip],
                "sessionAffinity": "None",
                "ipFamilies": ["IPv4"],
            }
        meta.update(
            name=key[2],
            namespace=key[1],
            labels={**meta.get("labels", {}), **body["metadata"].get("labels", {})},
            resourceVersion=str(next(self._versions)),
            managedFields=[
                {
                    "manager": manager or "unknown",
                    "operation": operation,
                    "apiVersion": body["apiVersion"],
                    "time": now,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {},
                }
            ],
        )
        status = (
            existing["status"]
            if existing
            else ({} if kind == "Deployment" else {"loadBalancer": {}})
        )
        obj = {
            "apiVersion": body["apiVersion"],
            "kind": kind,
            "metadata": meta,
            "spec": spec,
            "status": status,
        }
        self.objects[key] = obj
        return obj

    def _reconcile(self, key: tuple, obj: dict) -> None:
        """The controller's view: progressing until ``ready_after`` reads, then all ready."""
        reads = self._reads[key[1:]] = self._reads.get(key[1:], 0) + 1
        generation, replicas = obj["metadata"]["generation"], obj["spec"]["replicas"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.stall:
            reason, ready = "ProgressDeadlineExceeded", 0
        else:
            ready = replicas if reads >= self.ready_after else 0
            reason = "NewReplicaSetAvailable" if ready else "ReplicaSetUpdated"
        progressing = {
            "type": "Progressing",
            "status": "False" if self.stall else "True",
            "reason": reason,
            "message": f"rollout: {reason}",
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }
        obj["status"] = {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "conditions": [progressing],
            **(
                {"readyReplicas": ready, "availableReplicas": ready}
                if ready
                else {"unavailableReplicas": replicas}
            ),
        }


def _check_body(api_version: str, kind: str, key: tuple, body: Any, *, name_required: bool):
    if not isinstance(body, dict):
        return "the body is not an object"
    if (body.get("apiVersion"), body.get("kind")) != (api_version, kind):
        return f"body is {body.get('apiVersion')}/{body.get('kind')}, the URL serves {kind}"
    meta = body.get("metadata") or {}
    if name_required and not meta.get("name"):
        return "metadata.name is required"
    if key[2] and meta.get("name") != key[2]:
        return f"the name of the object ({meta.get('name')}) does not match the URL ({key[2]})"
    if meta.get("namespace", key[1]) != key[1]:
        return f"the namespace of the object ({meta['namespace']}) does not match the URL"
    return None


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def write_kubeconfig(directory: Path, server: str) -> Path:
    """A kubeconfig whose one context points at ``server`` with a bearer token."""
    path = directory / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters:\n- name: fake\n  cluster:\n    server: {server}\n"
        "users:\n- name: fake\n  user:\n    token: fake-token\n"
        "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
    )
    return path
