"""A recording fake of the Kubernetes API for EndpointSlices: list and watch, nothing else.

A real HTTP/1.1 server in a thread that answers what a real API server would for the calls
Strata's discovery makes: ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices``
with ``labelSelector`` (``k=v`` terms), a list ``resourceVersion``, and ``watch=true`` as a
chunked stream of JSON lines (``ADDED``/``MODIFIED``/``DELETED``, ``BOOKMARK`` when asked)
from a resource version, ending at ``timeoutSeconds``. A watch from a version older than the
retained history gets an ``ERROR`` event with a 410 Status, as after etcd compaction. The test
drives it: ``apply`` and ``delete`` slices, ``compact`` the history.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[a-z0-9-]+)/endpointslices$")


@dataclass
class FakeEndpointSlices:
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    slices: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # (resourceVersion, event type, object) of every change still retained
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    url: str = ""
    _versions: itertools.count = field(default_factory=lambda: itertools.count(100))
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None
    _stopping: bool = False
    _compacted_below: int = 0  # watches from an older resourceVersion get 410 Gone

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake.serve(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()  # fmt: skip
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def watches(self) -> int:
        return sum(q.get("watch") == ["true"] for m, p, q in self.requests)

    # --- what the test does ------------------------------------------------------------------

    def apply(self, namespace: str, body: dict[str, Any]) -> None:
        """Create or replace a slice (as the EndpointSlice controller writes them)."""
        name = body["metadata"]["name"]
        with self._changed:
            existing = self.slices.get((namespace, name))
            obj = copy.deepcopy(body)
            meta = obj["metadata"]
            meta["namespace"] = namespace
            meta["uid"] = existing["metadata"]["uid"] if existing else str(uuid.uuid4())
            meta["resourceVersion"] = str(next(self._versions))
            obj.setdefault("apiVersion", "discovery.k8s.io/v1")
            obj.setdefault("kind", "EndpointSlice")
            self.slices[(namespace, name)] = obj
            kind = "MODIFIED" if existing else "ADDED"
            self.history.append((int(meta["resourceVersion"]), kind, obj))
            self._changed.notify_all()

    def delete(self, namespace: str, name: str) -> None:
        with self._changed:
            obj = copy.deepcopy(self.slices.pop((namespace, name)))
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            self.history.append((int(obj["metadata"]["resourceVersion"]), "DELETED", obj))
            self._changed.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from an older resourceVersion now gets 410 Gone."""
        with self._changed:
            self.history.clear()
            self._compacted_below = next(self._versions)

    # --- the API -----------------------------------------------------------------------------

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        query = parse_qs(url.query)
        with self._changed:
            self.requests.append(("GET", url.path, query))
        match = PATH.match(url.path)
        if match is None:
            return _send_json(handler, 404, _status(404, "NotFound", f"no route {url.path}"))
        selector = _parse_selector(query.get("labelSelector", [""])[0])
        namespace = match["ns"]
        if query.get("watch") in (["true"], ["1"]):
            return self._watch(handler, namespace, selector, query)
        with self._changed:
            items = [copy.deepcopy(obj) for (ns, _), obj in sorted(self.slices.items())
                     if ns == namespace and _matches(obj, selector)]  # fmt: skip
            version = str(next(self._versions))
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": version}, "items": items}  # fmt: skip
        _send_json(handler, 200, body)

    def _watch(self, handler: BaseHTTPRequestHandler, namespace: str,
               selector: dict[str, str], query: dict[str, list[str]]) -> None:  # fmt: skip
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout_s = float(query.get("timeoutSeconds", ["30"])[0])
        bookmarks = query.get("allowWatchBookmarks") == ["true"]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        deadline = time.monotonic() + timeout_s
        with self._changed:
            gone = since and since < self._compacted_below
        if gone:
            _chunk(handler, {"type": "ERROR", "object": _status(410, "Expired",
                             f"too old resource version: {since}")})  # fmt: skip
            return _end(handler)
        sent = since
        while True:
            with self._changed:
                events = self._since(sent, namespace)
                if not events and not self._stopping:
                    self._changed.wait(max(0.0, min(0.2, deadline - time.monotonic())))
                    events = self._since(sent, namespace)
                stopping = self._stopping
            try:
                for rv, kind, obj in events:
                    sent = rv
                    if _matches(obj, selector):
                        _chunk(handler, {"type": kind, "object": obj})
                if bookmarks and not events:
                    bookmark = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                "metadata": {"resourceVersion": str(sent)}}  # fmt: skip
                    _chunk(handler, {"type": "BOOKMARK", "object": bookmark})
                if stopping or time.monotonic() >= deadline:
                    return _end(handler)
            except (BrokenPipeError, ConnectionResetError):
                return None

    def _since(self, rv: int, namespace: str) -> list[tuple[int, str, dict[str, Any]]]:
        return [e for e in self.history if e[0] > rv and e[2]["metadata"]["namespace"] == namespace]


def slice_for(name: str, address: str, ports: dict[str, int], *, model: str,
              role: str = "both", ready: bool = True) -> dict[str, Any]:  # fmt: skip
    """An EndpointSlice as the controller writes it for a one-pod worker Service: the
    Service's labels, its named ``ports`` (http, kv-events, kv-replay), one endpoint."""
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": name.rsplit("-", 1)[0],
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app.kubernetes.io/component": "worker",
                "strata.dev/model": model,
                "strata.dev/role": role,
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": k, "port": v, "protocol": "TCP"} for k, v in ports.items()],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "targetRef": {"kind": "Pod", "name": f"{name}-pod", "namespace": "strata"},
            }
        ],
    }


def _parse_selector(text: str) -> dict[str, str]:
    out = {}
    for term in filter(None, text.split(",")):
        key, sep, value = term.partition("=")
        if not sep or "!" in key:
            raise ValueError(f"selector term {term!r} not supported by this fake")
        out[key] = value
    return out


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def _send_json(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _chunk(handler: BaseHTTPRequestHandler, event: dict[str, Any]) -> None:
    data = json.dumps(event).encode() + b"\n"
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def _end(handler: BaseHTTPRequestHandler) -> None:
    try:
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass
    handler.close_connection = True
