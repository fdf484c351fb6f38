"""The control API under ``/admin``: worker registration and removal."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.frontend.auth import KeysFileError, KeyStore, load_keys_file
from serving.frontend.state import FrontendState
from serving.frontend.workers import Worker, WorkerRegistrationError, WorkerSpec
from serving.protocol.openai import APIError
from serving.protocol.openapi_docs import error_responses


class WorkerRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    kv_events_endpoint: str | None = None
    replay_endpoint: str | None = None
    worker_id: str | None = None
    role: Literal["prefill", "decode", "both"] | None = None
    model: str | None = Field(
        None, description="Served model to bind it to; default: the name on its /v1/models."
    )
    version: str | None = Field(
        None,
        description="Model version; a new version gets its own router index and pool, and new "
        "requests go to it once healthy (default: 'default').",
    )


def worker_json(worker: Worker, active_requests: int = 0) -> dict[str, Any]:
    return {
        "worker_id": worker.worker_id,
        "url": worker.url,
        "model": worker.served_model,
        "worker_model_name": worker.model_name,
        "version": worker.version,
        "role": worker.role,
        "healthy": worker.healthy,
        "kv_events_endpoint": worker.kv_events_endpoint,
        "replay_endpoint": worker.replay_endpoint,
        "num_event_batches": worker.num_event_batches,
        "draining": worker.draining,
        "active_requests": active_requests,
    }


def _workers_json(state: FrontendState) -> list[dict[str, Any]]:
    """Every worker with the requests the frontend streams from it now (the router's count)."""
    return [
        worker_json(worker, version.router.load.num_active_requests(worker.worker_id))
        for _, version in state.models.versions()
        for worker in version.pool.workers.values()
    ]


def _state(request: Request) -> FrontendState:
    return request.app.state.frontend  # type: ignore[no-any-return]


class WorkerInfo(BaseModel):
    worker_id: str
    url: str
    model: str
    worker_model_name: str
    version: str
    role: str
    healthy: bool
    kv_events_endpoint: str | None
    replay_endpoint: str | None
    num_event_batches: int
    draining: bool = False
    active_requests: int = 0


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


class WorkerKVBlocks(BaseModel):
    worker_id: str
    block_size: int
    blocks: dict[str, list[int]] = Field(description="Router block hashes per medium.")


class KeysReloaded(BaseModel):
    reloaded: bool = Field(description="False when no keys file is configured.")
    keys: dict[str, int] = Field(description="Keys in use by role.")


def make_admin_router() -> APIRouter:
    """``/admin``: every route needs the admin credential (``GuardMiddleware``)."""
    router = APIRouter(prefix="/admin", tags=["admin"])

    @router.get("/workers", response_model=WorkerList)
    async def list_workers(request: Request) -> dict[str, Any]:
        return {"workers": _workers_json(_state(request))}

    @router.post("/workers", status_code=201, response_model=WorkerInfo)
    async def add_worker(body: WorkerRegistration, request: Request) -> dict[str, Any]:
        spec = WorkerSpec(body.url.rstrip("/"), body.kv_events_endpoint, body.replay_endpoint,
                          body.worker_id, body.role, body.model, body.version)  # fmt: skip
        try:
            worker = await _state(request).models.register(spec)
        except WorkerRegistrationError as exc:
            raise APIError(str(exc), param="url") from exc
        return worker_json(worker)

    @router.get(
        "/workers/{worker_id}/kv_blocks",
        response_model=WorkerKVBlocks,
        responses=error_responses(404),
    )
    async def worker_kv_blocks(worker_id: str, request: Request) -> dict[str, Any]:
        """What the router's KV index holds for one worker: router block hashes per medium."""
        found = _state(request).models.locate(worker_id)
        if found is None:
            raise APIError(f"no worker {worker_id!r}", status_code=404, param="worker_id")
        router = found[1].router
        held = router.indexer.held_blocks(worker_id)
        return {
            "worker_id": worker_id,
            "block_size": router.block_size,
            "blocks": {medium: sorted(hashes) for medium, hashes in held.items()},
        }

    @router.post(
        "/workers/{worker_id}/drain", response_model=WorkerInfo, responses=error_responses(404)
    )
    async def drain_worker(worker_id: str, request: Request) -> dict[str, Any]:
        """Stop routing new requests to the worker (the planner's scale-down); its streams go
        on. ``active_requests`` falls to 0 when they have ended; then stop and DELETE it."""
        found = _state(request).models.locate(worker_id)
        if found is None:
            raise APIError(f"no worker {worker_id!r}", status_code=404, param="worker_id")
        _, version, worker = found
        version.pool.drain(worker_id)
        return worker_json(worker, version.router.load.num_active_requests(worker_id))

    @router.delete(
        "/workers/{worker_id}", response_model=WorkerInfo, responses=error_responses(404)
    )
    async def remove_worker(worker_id: str, request: Request) -> dict[str, Any]:
        worker = _state(request).models.deregister(worker_id)
        if worker is None:
            raise APIError(f"no worker {worker_id!r}", status_code=404, param="worker_id")
        return worker_json(worker)

    @router.post("/keys/reload", response_model=KeysReloaded)
    async def reload_keys(request: Request) -> dict[str, Any]:
        """Re-read the keys file now (it is also re-read when it changes); a bad file is a
        400 naming the field, and the keys in use stay."""
        gate = _state(request).gate
        assert gate is not None
        if gate.keys_file is None:
            return {"reloaded": False, "keys": _key_counts(gate.keys)}
        try:
            gate.keys.replace_file(load_keys_file(gate.keys_file))
        except KeysFileError as exc:
            gate.metrics.keys_reloads.labels(outcome="error").inc()
            raise APIError(str(exc), param="keys_file") from None
        gate.reload_keys(force=True)
        return {"reloaded": True, "keys": _key_counts(gate.keys)}

    return router


def _key_counts(keys: KeyStore) -> dict[str, int]:
    return {role: keys.count(role) for role in ("inference", "admin")}
