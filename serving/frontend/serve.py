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
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from serving.engine.factory import load_tokenizer
from serving.frontend.app import create_frontend_app
from serving.frontend.metrics import FrontendMetrics
from serving.frontend.router import Router
from serving.frontend.state import FrontendSettings, FrontendState
from serving.frontend.workers import WorkerSpec
from serving.netutil import free_port, free_port_pair, wait_healthy
from serving.router.disagg import (
    DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
    DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
    DisaggConfig,
)
from serving.router.policies import DEFAULT_PREFILL_SCALE, KVCostConfig, PolicyName
from serving.vllm_engine import launcher as vllm_launcher
from serving.vllm_engine.discovery import pool_block_size

logger = logging.getLogger(__name__)


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

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_dir.name

    @property
    def roles(self) -> list[str]:
        """One role per local worker, in start order."""
        return (
            ["both"] * self.num_workers
            + ["prefill"] * self.num_prefill
            + ["decode"] * self.num_decode
        )


@dataclass(slots=True)
class _LocalWorker:
    index: int
    role: str
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


def worker_command(cfg: ServeConfig, index: int, role: str, port: int, kv_port: int) -> list[str]:
    """The ``python -m serving.worker`` (or vLLM) command line of local worker ``index``."""
    if cfg.engine == "vllm":
        return vllm_launcher.vllm_command(
            vllm_launcher.find_vllm_python(cfg.vllm_python), model_dir=cfg.model_dir,
            served_model_name=cfg.model_name, port=port, kv_events_port=kv_port,
            block_size=cfg.block_size, role=role, extra_args=cfg.worker_args,
        )  # fmt: skip
    role_args = [] if role == "both" else ["--role", role, "--kv-transport", cfg.kv_transport]
    if cfg.worker_devices:
        role_args += ["--device", cfg.worker_devices[index % len(cfg.worker_devices)]]
    return [
        sys.executable, "-m", "serving.worker",
        "--model", str(cfg.model_dir),
        "--engine", cfg.engine,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--kv-events-port", str(kv_port),
        "--served-model-name", cfg.model_name,
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
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> list[WorkerSpec]:
        cfg = self.config
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        for i, role in enumerate(cfg.roles):
            port, kv_port = free_port(), free_port_pair()
            cmd = worker_command(cfg, i, role, port, kv_port)
            worker = _LocalWorker(i, role, port, kv_port, cmd, cfg.log_dir / f"worker-{i}.log")
            if cfg.engine == "vllm":
                worker.own_group = True
                worker.env = vllm_launcher.vllm_env(
                    os.environ, index=i, num_workers=len(cfg.roles),
                    nixl_side_channel_port=None if role == "both" else free_port(),
                )  # fmt: skip
            worker.start()
            self.workers.append(worker)
        deadline = time.monotonic() + cfg.startup_timeout_s
        for worker in self.workers:
            _wait_healthy(worker, deadline)
        self._thread.start()
        return [WorkerSpec(w.url, worker_id=w.worker_id, role=w.role) for w in self.workers]

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
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
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


def build_frontend_state(
    config: ServeConfig, worker_specs: list[WorkerSpec], max_model_len: int, vocab_size: int
) -> FrontendState:
    metrics = FrontendMetrics(config.model_name)
    cost = KVCostConfig(block_size=config.block_size, prefill_scale=config.kv_prefill_scale)
    router = Router(config.router, config.block_size, metrics, cost=cost)
    settings = FrontendSettings(
        served_model_names=[config.model_name],
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        api_key=config.api_key,
        migration_limit=config.migration_limit,
        disagg=DisaggConfig(config.max_local_prefill_tokens, config.max_local_prefill_fraction),
    )
    return FrontendState(
        settings=settings,
        tokenizer=load_tokenizer(config.model_dir),
        router=router,
        metrics=metrics,
        initial_workers=worker_specs,
    )


def run_serve(config: ServeConfig) -> None:
    supervisor = WorkerSupervisor(config)
    try:
        specs = supervisor.start() if config.roles else []
        specs += [WorkerSpec.parse(text) for text in config.worker_urls]
        if not specs:
            raise RuntimeError(
                "no workers: use --workers N, --prefill P --decode D and/or --worker-url URL"
            )
        max_len, vocab = model_limits(config.model_dir, [s.url for s in specs])
        config.block_size = pool_block_size([s.url for s in specs], config.block_size)
        state = build_frontend_state(config, specs, max_len, vocab)
        targets_dir = config.prometheus_targets_dir or Path(".strata/local/prometheus/targets")
        if targets_dir.is_dir():
            state.settings.prometheus_targets_file = (
                targets_dir / f"strata-serve-{config.port}.json"
            )
            state.settings.self_address = f"{config.host}:{config.port}"
        state.extra_registries.extend(config.extra_metric_registries)
        app = create_frontend_app(state)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                timeout_graceful_shutdown=30,
            )
        )
        roles = ", ".join(f"{s.worker_id or s.url} ({s.role or 'from /health'})" for s in specs)
        print(
            f"strata serve: {len(specs)} worker(s), router {config.router}: {roles}\n"
            f"endpoint: http://{config.host}:{config.port}/v1  (model {config.model_name})\n"
            f"metrics:  http://{config.host}:{config.port}/metrics",
            flush=True,
        )
        # uvicorn re-raises the signal that stopped it once it has shut down; with the default
        # SIGTERM action that would kill this process before the workers are stopped below.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        server.run()
    finally:
        supervisor.stop()
        logger.info("all workers stopped (pid %d)", os.getpid())
