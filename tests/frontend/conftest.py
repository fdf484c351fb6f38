"""Frontend fixtures: real worker processes, the frontend app served in a thread."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from serving.engine.config import EngineConfig
from serving.frontend.app import FrontendState, create_frontend_app
from serving.frontend.discovery import DiscoverySource
from serving.frontend.router import Router
from serving.frontend.serve import ServeConfig, build_frontend_state, entry_limits
from serving.frontend.workers import WorkerPool, WorkerSpec
from serving.worker.config import WorkerConfig
from serving.worker.server import build_state
from tests.worker.conftest import ThreadServer, free_port, serve_in_thread, wait_healthy


@dataclass
class FrontendServer:
    url: str
    state: FrontendState
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _current(self, model: str | None):  # type: ignore[no-untyped-def]
        models = self.state.models
        version = models.get(model or models.names[0]).current()
        assert version is not None, "no version registered yet"
        return version

    def router(self, model: str | None = None) -> Router:
        """The current version's router of ``model`` (default: the first served model)."""
        return self._current(model).router

    def pool(self, model: str | None = None) -> WorkerPool:
        return self._current(model).pool

    def tokenizer(self, model: str | None = None):  # type: ignore[no-untyped-def]
        models = self.state.models
        return models.get(model or models.names[0]).tokenizer

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def kill(self) -> None:
        """Stop at once: open connections are cut, nothing drains (a crash, as far as
        clients and workers can tell; the next frontend starts from nothing)."""
        self.server.force_exit = True
        self.server.should_exit = True
        self.thread.join(60)


def start_frontend(
    model_dir: Path,
    worker_urls: list[str],
    *,
    router: str = "kv",
    api_key: str | None = None,
    health_interval_s: float = 0.2,
    kv_events_grace_s: float = 5.0,
    require_workers: bool = True,
    port: int | None = None,
    discovery_source: DiscoverySource | None = None,
    sock: socket.socket | None = None,
    **overrides: Any,
) -> FrontendServer:
    """``sock``: serve on this listening socket (e.g. one bound with ``SO_REUSEPORT``).
    ``overrides``: more ``ServeConfig`` fields (admin_key, keys_file, max_inflight_requests,
    extra_models, ...)."""
    config = ServeConfig(model_dir=model_dir, router=router, api_key=api_key,  # type: ignore[arg-type]
                         served_model_name="smollm2-135m-instruct", **overrides)  # fmt: skip
    specs = [WorkerSpec.parse(u) for u in worker_urls]
    state = build_frontend_state(config, specs, entry_limits(config, specs))
    state.settings.health_interval_s = health_interval_s
    state.settings.kv_events_grace_s = kv_events_grace_s
    state.discovery_source = discovery_source
    port = sock.getsockname()[1] if sock is not None else port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_frontend_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    sockets = [sock] if sock is not None else None
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    if require_workers:
        wait_healthy(url, timeout_s=60)
    return FrontendServer(url=url, state=state, server=server, thread=thread)


def mock_worker_in_thread(
    model_dir: Path,
    *,
    name: str = "smollm2-135m-instruct",
    speedup: float = 1.0,
    kv_events: bool = True,
) -> ThreadServer:
    """A mock-engine worker served in this process, with KV events unless ``kv_events`` is
    False (starts in a second, even on a loaded machine: nothing more to import)."""
    config = WorkerConfig(
        engine=EngineConfig(model_dir=model_dir, engine="mock", speedup=speedup),
        kv_events_port=0 if kv_events else None,
        kv_events_host="127.0.0.1",
        served_model_name=[name],
    )
    return serve_in_thread(build_state(config))
