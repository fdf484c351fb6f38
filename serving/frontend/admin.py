"""The control API under ``/admin``: worker registration and removal."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from serving.frontend.state import FrontendState
from serving.frontend.workers import Worker, WorkerRegistrationError, WorkerSpec
from serving.protocol.openai import APIError


class WorkerRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    kv_events_endpoint: str | None = None
    replay_endpoint: str | None = None
    worker_id: str | None = None
    role: Literal["prefill", "decode", "both"] | None = None


def worker_json(worker: Worker) -> dict[str, Any]:
    return {
        "worker_id": worker.worker_id,
        "url": worker.url,
        "model": worker.model_name,
        "role": worker.role,
        "healthy": worker.healthy,
        "kv_events_endpoint": worker.kv_events_endpoint,
        "replay_endpoint": worker.replay_endpoint,
        "num_event_batches": worker.num_event_batches,
    }


def _state(request: Request) -> FrontendState:
    state: FrontendState = request.app.state.frontend
    assert state.pool is not None
    return state


def make_admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.get("/workers")
    async def list_workers(request: Request) -> dict[str, Any]:
        pool = _state(request).pool
        assert pool is not None
        return {"workers": [worker_json(w) for w in pool.workers.values()]}

    @router.post("/workers", status_code=201)
    async def add_worker(body: WorkerRegistration, request: Request) -> dict[str, Any]:
        pool = _state(request).pool
        assert pool is not None
        spec = WorkerSpec(body.url.rstrip("/"), body.kv_events_endpoint, body.replay_endpoint,
                          body.worker_id, body.role)  # fmt: skip
        try:
            worker = await pool.register(spec)
        except WorkerRegistrationError as exc:
            raise APIError(str(exc), param="url") from exc
        return worker_json(worker)

    @router.delete("/workers/{worker_id}")
    async def remove_worker(worker_id: str, request: Request) -> dict[str, Any]:
        pool = _state(request).pool
        assert pool is not None
        worker = pool.deregister(worker_id)
        if worker is None:
            raise APIError(f"no worker {worker_id!r}", status_code=404, param="worker_id")
        return worker_json(worker)

    return router
