"""The frontend's admin API, as the connectors use it to add and drain workers.

``GET /admin/workers`` lists workers (``worker_id``, ``url``, ``role``, ``healthy``,
``draining``, ``active_requests``); ``POST /admin/workers`` registers one;
``POST /admin/workers/{id}/drain`` stops routing new requests to it (its streams go on);
``DELETE /admin/workers/{id}`` removes it. Every call carries the admin bearer token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from serving.planner.connectors.base import ConnectorError


class FrontendAdmin:
    def __init__(self, url: str, admin_key: str | None = None, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers)

    def workers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/admin/workers")["workers"]

    def register(
        self, url: str, role: str, worker_id: str, model: str | None = None
    ) -> dict[str, Any]:
        body = {"url": url, "role": role, "worker_id": worker_id}
        if model is not None:
            body["model"] = model
        return self._call("POST", "/admin/workers", body)

    def drain(self, worker_id: str) -> dict[str, Any]:
        return self._call("POST", f"/admin/workers/{worker_id}/drain")

    def deregister(self, worker_id: str) -> None:
        self._call("DELETE", f"/admin/workers/{worker_id}", allow_missing=True)

    def active_requests(self, worker_id: str) -> int | None:
        """Requests the frontend still streams from ``worker_id``; None once it is gone."""
        for worker in self.workers():
            if worker["worker_id"] == worker_id:
                return int(worker.get("active_requests", 0))
        return None

    def worker_for_host(self, host: str) -> dict[str, Any] | None:
        """The registered worker whose URL points at ``host`` (a pod IP)."""
        for worker in self.workers():
            if urlsplit(worker["url"]).hostname == host:
                return worker
        return None

    def close(self) -> None:
        self.http.close()

    def _call(
        self, method: str, path: str, body: dict | None = None, allow_missing: bool = False
    ) -> dict[str, Any]:
        try:
            response = self.http.request(method, f"{self.url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise ConnectorError(f"{method} {self.url}{path}: {exc}") from exc
        if response.status_code == 404 and allow_missing:
            return {}
        if response.status_code >= 400:
            raise ConnectorError(
                f"{method} {self.url}{path}: HTTP {response.status_code}: {response.text[:300]}"
            )
        return response.json() if response.content else {}
