"""The frontend's settings (parsed once at start-up) and its per-process state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from serving.frontend.discovery import Discovery, DiscoverySource
from serving.frontend.guard import Gate
from serving.frontend.metrics import FrontendMetrics
from serving.frontend.models import ModelSet
from serving.frontend.worker_client import WorkerClient
from serving.frontend.workers import WorkerSpec
from serving.router.disagg import DisaggConfig

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class FrontendSettings:
    api_key: str | None = None
    admin_key: str | None = None  # the admin credential for /admin (never an inference key)
    keys_file: Path | None = None  # hashed keys and limits, re-read when it changes
    keys_reload_interval_s: float = 1.0
    # Admission, per served model (0: no limit); the keys file's `models:` overrides them.
    max_inflight_requests: int = 0
    max_queued_prompt_tokens: int = 0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Worker discovery beside HTTP registration: static (none) | file | kubernetes.
    discovery: Literal["static", "file", "kubernetes"] = "static"
    discovery_file: Path | None = None
    kube_namespace: str | None = None  # None: the pod's own namespace, else "default"
    kube_selector: str = "app.kubernetes.io/component=worker"
    migration_limit: int = 3
    # A migrating stream waits this long for a healthy worker before it ends with a 503.
    migration_wait_s: float = 30.0
    health_interval_s: float = 2.0
    max_health_failures: int = 3
    # A worker that served requests but sent no KV event for this long triggers a warning.
    kv_events_grace_s: float = 5.0
    # Prometheus file service discovery: this frontend and its workers, kept current.
    prometheus_targets_file: Path | None = None
    self_address: str | None = None  # host:port of this frontend, for the targets file
    # Conditional disaggregation (used when prefill workers are registered).
    disagg: DisaggConfig = field(default_factory=DisaggConfig)


@dataclass(slots=True)
class FrontendState:
    """Everything one frontend process holds; the app's routes and background tasks share it."""

    settings: FrontendSettings
    models: ModelSet
    metrics: FrontendMetrics
    gate: Gate | None = None  # admission and keys (built by create_frontend_app)
    # Where workers come from besides registration (None: from the settings, if any).
    discovery_source: DiscoverySource | None = None
    discovery: Discovery | None = None  # running once the app has started
    http: httpx.AsyncClient | None = None  # control plane: probes, registration, prefill
    workers_client: WorkerClient = field(default_factory=WorkerClient)  # token streams
    initial_workers: list[WorkerSpec] = field(default_factory=list)
    # More registries to expose on /metrics (e.g. the workflow runner's, in `strata demo`).
    extra_registries: list[Any] = field(default_factory=list)
    background: list[asyncio.Task] = field(default_factory=list)
