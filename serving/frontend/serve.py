"""``strata serve``: supervised local workers plus the frontend, stopped together.

``--workers N`` starts aggregated workers (role ``both``); ``--prefill P --decode D`` starts a
disaggregated pool (roles ``prefill``/``decode``, each with a KV transport: NIXL, else TCP,
loudly); both may be mixed. ``--engine vllm`` starts stock vLLM servers instead
(``serving/vllm_engine/launcher.py``), each in its own process group.

Workers are ``python -m serving.worker`` processes on free loopback ports, each publishing KV
events. A worker that exits unexpectedly is restarted (bounded); meanwhile the frontend's
health checks take it out of routing and its requests migrate. Ctrl-C / SIGTERM stops the
frontend first (draining), then the workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import uvicorn

from serving.engine.factory import load_tokenizer
from serving.frontend.app import create_frontend_app
from serving.frontend.metrics import FrontendMetrics
from serving.frontend.model_entry import ModelEntry
from serving.frontend.models import ModelSet, ServedModel
from serving.frontend.router import Router
from serving.frontend.state import DEFAULT_MAX_REQUEST_BYTES, FrontendSettings, FrontendState
from serving.frontend.workers import WorkerSpec
from serving.kvcache.config import tier_worker_args
from serving.netutil import free_port, free_port_pair, wait_healthy
from serving.router.disagg import (
    DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
    DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
    DisaggConfig,
)
from serving.router.policies import (
    DEFAULT_PREFILL_SCALE,
    DEFAULT_TIER_WEIGHTS,
    KVCostConfig,
    PolicyName,
)
from serving.startup import freeze_startup_heap
from serving.vllm_engine import launcher as vllm_launcher
from serving.vllm_engine.discovery import pool_block_size

logger = logging.getLogger(__name__)

FRONTEND_KEEP_ALIVE_S = 75


@dataclass(slots=True)
class ServeConfig:
    model_dir: Path
    num_workers: int = 1
    num_prefill: int = 0
    num_decode: int = 0
    # Transport of the prefill/decode workers: auto (NIXL, else TCP) | nixl | tcp.
    kv_transport: str = "auto"
    max_local_prefill_tokens: int = DEFAULT_MAX_LOCAL_PREFILL_TOKENS
    max_local_prefill_fraction: float = DEFAULT_MAX_LOCAL_PREFILL_FRACTION
    engine: str = "builtin"
    router: PolicyName = "kv"
    host: str = "127.0.0.1"
    port: int = 8000
    # Bind with SO_REUSEPORT: several frontend processes share the port, the kernel spreads
    # connections over them (each has its own router index from the same KV events).
    reuse_port: bool = False
    worker_urls: list[str] = field(default_factory=list)
    api_key: str | None = None
    served_model_name: str | None = None
    block_size: int = 16
    migration_limit: int = 3
    kv_prefill_scale: float = DEFAULT_PREFILL_SCALE
    worker_args: list[str] = field(default_factory=list)  # passed to every local worker
    # Local worker i gets --device worker_devices[i % len] (e.g. one GPU each); empty: default.
    worker_devices: list[str] = field(default_factory=list)
    max_restarts: int = 5
    startup_timeout_s: float = 300.0
    log_dir: Path = Path(".strata/logs")
    # Where `strata local up`'s Prometheus looks for targets; None: that directory if it exists.
    prometheus_targets_dir: Path | None = None
    extra_metric_registries: list = field(default_factory=list)
    vllm_python: str | None = None  # --engine vllm: the interpreter with vLLM (None: look)
    # More served models behind the same endpoint (the fields above describe the first).
    extra_models: list[ModelEntry] = field(default_factory=list)
    admin_key: str | None = None
    keys_file: Path | None = None
    max_inflight_requests: int = 0
    max_queued_prompt_tokens: int = 0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Worker discovery besides --worker-url and registration (see FrontendSettings).
    discovery: Literal["static", "file", "kubernetes"] = "static"
    # KV tiers of local workers (serving/kvcache): sizes, G3's root dir, G4's root prefix;
    # the kv router's credit per cached block by medium (merged over the defaults).
    kv_host_gib: float = 0.0
    kv_disk_gib: float = 0.0
    kv_disk_dir: Path | None = None
    kv_s3_uri: str | None = None
    kv_tier_weights: dict[str, float] = field(default_factory=dict)
    discovery_file: Path | None = None
    kube_namespace: str | None = None
    kube_selector: str = "app.kubernetes.io/component=worker"
    # The planner in this process (serving/planner/serve_planner.py): it adds and drains local
    # workers of the first model.
    planner: bool = False
    planner_config: Path | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_dir.name

    @property
    def entries(self) -> list[ModelEntry]:
        """Every served model, the first one built from the top-level fields."""
        first = ModelEntry(self.model_dir, self.model_name, self.engine, self.num_workers,
                           self.num_prefill, self.num_decode)  # fmt: skip
        return [first, *self.extra_models]

    @property
    def roles(self) -> list[str]:
        """One role per local worker of every model, in start order."""
        return [role for entry in self.entries for role in entry.roles]


@dataclass(slots=True)
class _LocalWorker:
    index: int
    role: str
    model: str
    port: int
    kv_port: int
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    num_restarts: int = 0
    env: dict[str, str] | None = None
    # A process group of its own (vLLM: API server + engine core), killed as a whole.
    own_group: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_id(self) -> str:
        return f"local-{self.index}" if self.role == "both" else f"{self.role}-{self.index}"

    def start(self) -> None:
        if self.own_group and self.proc is not None:
            # A killed vLLM server leaves its engine core holding the KV-event ports.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=self.own_group)  # fmt: skip
        log.close()


def worker_command(
    cfg: ServeConfig,
    index: int,
    role: str,
    port: int,
    kv_port: int,
    entry: ModelEntry | None = None,
) -> list[str]:
    """The ``python -m serving.worker`` (or vLLM) command line of local worker ``index`` of
    ``entry`` (default: the first model)."""
    entry = entry or cfg.entries[0]
    if entry.engine == "vllm":
        return vllm_launcher.vllm_command(
            vllm_launcher.find_vllm_python(cfg.vllm_python), model_dir=entry.model_dir,
            served_model_name=entry.name, port=port, kv_events_port=kv_port,
            block_size=cfg.block_size, role=role, extra_args=cfg.worker_args,
        )  # fmt: skip
    role_args = [] if role == "both" else ["--role", role, "--kv-transport", cfg.kv_transport]
    role_args += tier_worker_args(
        host_gib=cfg.kv_host_gib, disk_gib=cfg.kv_disk_gib, disk_dir=cfg.kv_disk_dir,
        s3_uri=cfg.kv_s3_uri, worker_index=index, model_name=entry.name,
    )  # fmt: skip
    if cfg.worker_devices:
        role_args += ["--device", cfg.worker_devices[index % len(cfg.worker_devices)]]
    return [
        sys.executable, "-m", "serving.worker",
        "--model", str(entry.model_dir),
        "--engine", entry.engine,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--kv-events-port", str(kv_port),
        "--served-model-name", entry.name,
        "--block-size", str(cfg.block_size),
        "--log-level", "warning",
        *role_args,
        *cfg.worker_args,
    ]  # fmt: skip


class WorkerSupervisor:
    """Starts local worker processes, restarts crashed ones, stops them all."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.workers: list[_LocalWorker] = []
        self._next_index = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> list[WorkerSpec]:
        cfg = self.config
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        local = [(entry, role) for entry in cfg.entries for role in entry.roles]
        for entry, role in local:
            self.workers.append(self._new_worker(entry, role))
        timeout_s = cfg.startup_timeout_s
        if any(w.own_group for w in self.workers):  # vLLM starts in minutes on CPU
            timeout_s = max(timeout_s, vllm_launcher.STARTUP_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            _wait_healthy(worker, deadline)
        self._thread.start()
        return [
            WorkerSpec(w.url, worker_id=w.worker_id, role=w.role, model=w.model)
            for w in self.workers
        ]

    def _new_worker(self, entry: ModelEntry, role: str) -> _LocalWorker:
        cfg, i = self.config, self._next_index
        self._next_index += 1
        port, kv_port = free_port(), free_port_pair()
        cmd = worker_command(cfg, i, role, port, kv_port, entry)
        log_path = cfg.log_dir / f"worker-{i}.log"
        worker = _LocalWorker(i, role, entry.name, port, kv_port, cmd, log_path)
        if entry.engine == "vllm":
            worker.own_group = True
            worker.env = vllm_launcher.vllm_env(
                os.environ, index=i, num_workers=len(cfg.roles),
                nixl_side_channel_port=None if role == "both" else free_port(),
            )  # fmt: skip
        worker.start()
        return worker

    # The planner's local connector (serving/planner/connectors/local.py) adds and removes
    # workers of the first model at run time.
    def spawn(self, role: str) -> _LocalWorker:
        worker = self._new_worker(self.config.entries[0], role)
        self.workers = [*self.workers, worker]
        return worker

    def wait_worker_healthy(self, worker: _LocalWorker, timeout_s: float) -> None:
        _wait_healthy(worker, time.monotonic() + timeout_s)

    def stop_worker(self, worker: _LocalWorker, timeout_s: float) -> None:
        """SIGTERM (the worker finishes its requests), SIGKILL after ``timeout_s``; never
        restarted."""
        self.workers = [w for w in self.workers if w is not worker]
        _terminate([worker], timeout_s)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.poll() is None or self._stopping.is_set():
                    continue
                if worker.num_restarts >= self.config.max_restarts:
                    continue
                worker.num_restarts += 1
                logger.warning(
                    "worker %d exited with %s; restarting (%d/%d), log %s",
                    worker.index,
                    proc.returncode,
                    worker.num_restarts,
                    self.config.max_restarts,
                    worker.log_path,
                )
                worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        _terminate(self.workers, timeout_s)


def _terminate(workers: list[_LocalWorker], timeout_s: float) -> None:
    for worker in workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        if worker.proc is None:
            continue
        try:
            worker.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
        if worker.own_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.proc.pid, signal.SIGKILL)  # whatever it left behind


def _wait_healthy(worker: _LocalWorker, deadline: float) -> None:
    try:
        wait_healthy(worker.url, worker.proc, timeout_s=max(0.0, deadline - time.monotonic()))
    except RuntimeError:
        tail = worker.log_path.read_text()[-2000:]
        raise RuntimeError(f"worker {worker.index} exited during start-up:\n{tail}") from None
    except TimeoutError:
        raise RuntimeError(
            f"worker {worker.index} not healthy in time; log {worker.log_path}"
        ) from None


def model_limits(model_dir: Path, worker_urls: list[str]) -> tuple[int, int]:
    """(max_model_len, vocab_size). The context is the smallest any worker reports on
    /v1/models (workers know their KV pool and overrides); the checkpoint's config.json only
    when no worker reports one. The vocabulary size comes from config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab_size = int(config["vocab_size"])
    lengths = []
    for url in worker_urls:
        try:
            card = httpx.get(f"{url.split(';')[0]}/v1/models", timeout=10).json()["data"][0]
            if card.get("max_model_len"):
                lengths.append(int(card["max_model_len"]))
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            continue
    if not lengths:
        lengths.append(int(config.get("max_position_embeddings", 2**31 - 1)))
    return min(lengths), vocab_size


def entry_limits(config: ServeConfig, specs: list[WorkerSpec]) -> dict[str, tuple[int, int]]:
    """Served model name -> (max_model_len, vocab_size), from each model's own workers."""
    entries = config.entries
    limits = {}
    for entry in entries:
        urls = [s.url for s in specs
                if s.model == entry.name or (s.model is None and len(entries) == 1)]  # fmt: skip
        limits[entry.name] = model_limits(entry.model_dir, urls)
    return limits


def build_frontend_state(
    config: ServeConfig, worker_specs: list[WorkerSpec], limits: dict[str, tuple[int, int]]
) -> FrontendState:
    """``limits``: served model name -> (max_model_len, vocab_size) (``entry_limits``)."""
    metrics = FrontendMetrics(config.model_name)
    cost = KVCostConfig(
        block_size=config.block_size,
        prefill_scale=config.kv_prefill_scale,
        tier_weights={**DEFAULT_TIER_WEIGHTS, **config.kv_tier_weights},
    )

    def make_router(model: str) -> Router:
        return Router(config.router, config.block_size, metrics, cost=cost, model=model)

    served = [
        ServedModel(e.name, load_tokenizer(e.model_dir), *limits[e.name]) for e in config.entries
    ]
    settings = FrontendSettings(
        api_key=config.api_key,
        admin_key=config.admin_key,
        keys_file=config.keys_file,
        max_inflight_requests=config.max_inflight_requests,
        max_queued_prompt_tokens=config.max_queued_prompt_tokens,
        max_request_bytes=config.max_request_bytes,
        discovery=config.discovery,
        discovery_file=config.discovery_file,
        kube_namespace=config.kube_namespace,
        kube_selector=config.kube_selector,
        migration_limit=config.migration_limit,
        disagg=DisaggConfig(config.max_local_prefill_tokens, config.max_local_prefill_fraction),
    )
    return FrontendState(
        settings=settings,
        models=ModelSet(served, make_router, block_size=config.block_size),
        metrics=metrics,
        initial_workers=worker_specs,
    )


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound with ``SO_REUSEPORT`` (Linux spreads new connections over
    every process bound so to the same address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_serve(config: ServeConfig) -> None:
    supervisor = WorkerSupervisor(config)
    planner = None
    if threading.current_thread() is threading.main_thread():
        # A SIGTERM while the workers start (minutes on a busy CPU) must still stop them: the
        # default action would end this process at once and leave them running.
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        specs = supervisor.start() if config.roles else []
        specs += [WorkerSpec.parse(text) for text in config.worker_urls]
        if not specs and config.discovery == "static":
            raise RuntimeError(
                "no workers: use --workers N, --prefill P --decode D, --worker-url URL "
                "and/or --discovery file|kubernetes"
            )
        config.block_size = pool_block_size([s.url for s in specs], config.block_size)
        state = build_frontend_state(config, specs, entry_limits(config, specs))
        targets_dir = config.prometheus_targets_dir or Path(".strata/local/prometheus/targets")
        if targets_dir.is_dir():
            state.settings.prometheus_targets_file = (
                targets_dir / f"strata-serve-{config.port}.json"
            )
            state.settings.self_address = f"{config.host}:{config.port}"
        state.extra_registries.extend(config.extra_metric_registries)
        if config.planner:
            from serving.planner.serve_planner import start_planner

            planner = start_planner(config, supervisor, state)
        app = create_frontend_app(state)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                timeout_graceful_shutdown=30,
                # Longer than the idle timeout of a client's pool or a load balancer in front
                # (an AWS ALB's is 60 s): a connection the server closes first races with a
                # request sent on it, which fails with a reset (a 502 behind a balancer).
                timeout_keep_alive=FRONTEND_KEEP_ALIVE_S,
            )
        )
        roles = ", ".join(f"{s.worker_id or s.url} ({s.role or 'from /health'})" for s in specs)
        names = ", ".join(e.name for e in config.entries)
        print(
            f"strata serve: {len(specs)} worker(s), router {config.router}: {roles}\n"
            f"endpoint: http://{config.host}:{config.port}/v1  (model {names})\n"
            f"metrics:  http://{config.host}:{config.port}/metrics",
            flush=True,
        )
        # uvicorn re-raises the signal that stopped it once it has shut down; with the default
        # SIGTERM action that would kill this process before the workers are stopped below.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            freeze_startup_heap()
        server.run(sockets=[reuse_port_socket(config.host, config.port)] if config.reuse_port
                   else None)  # fmt: skip
    finally:
        if planner is not None:
            planner.stop()
        supervisor.stop()
        logger.info("all workers stopped (pid %d)", os.getpid())
