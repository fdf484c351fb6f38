"""The local stand-ins for the cloud, on loopback: S3 (moto's server), MLflow and Prometheus.

Everything lives under one root (default ``.strata/local``)::

    run/<name>.pid, run/<name>.json   pid; url, port and process start time of each service
    logs/<name>.log                   each service's stdout and stderr
    s3/index.json, s3/blobs/          the S3 snapshot (``workflows.local_s3_snapshot``)
    mlflow/mlflow.db                  MLflow's SQLite store (artifacts go to s3://strata-mlflow/)
    prometheus/prometheus.yml, prometheus/targets/*.json, prometheus/data/

Each service runs as its own process group, so it outlives the command that started it and
``down`` stops it with every child. S3 contents survive restarts through the snapshot: ``down``
saves new and changed objects before stopping moto, ``up`` loads them into a fresh one. Objects
written after the last ``down`` are lost if moto dies by other means.

Owns processes, pid files and the S3 snapshot; the services' own state stays theirs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
from botocore.exceptions import BotoCoreError, ClientError

from workflows.local_grafana import UNAVAILABLE as GRAFANA_UNAVAILABLE
from workflows.local_grafana import find_launcher as find_grafana
from workflows.local_grafana import grafana_launch
from workflows.local_s3_snapshot import SnapshotError, restore_s3, snapshot_s3
from workflows.steps.s3 import LOCAL_AWS_CREDENTIALS, make_s3_client

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path(".strata/local")
LOOPBACK = "127.0.0.1"
MLFLOW_BUCKET = "strata-mlflow"
SERVICE_NAMES = ("s3", "mlflow", "prometheus", "grafana")
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prometheus": 9090, "grafana": 3000}
_HEALTH_PATHS = {"s3": "/", "mlflow": "/health", "prometheus": "/-/ready", "grafana": "/api/health"}

ServiceState = Literal["running", "unhealthy", "stopped", "unavailable"]


class LocalServicesError(Exception):
    """A local service failed to start or stop; the message says which and where its log is."""


@dataclass(frozen=True)
class ServiceHandle:
    name: str
    url: str
    pid: int | None
    state: ServiceState
    log_path: Path
    detail: str = ""


@dataclass(frozen=True)
class LocalServices:
    root: Path
    handles: tuple[ServiceHandle, ...]

    def __getitem__(self, name: str) -> ServiceHandle:
        for handle in self.handles:
            if handle.name == name:
                return handle
        raise KeyError(name)

    @property
    def s3_url(self) -> str:
        return self["s3"].url

    @property
    def mlflow_url(self) -> str:
        return self["mlflow"].url

    @property
    def prometheus_url(self) -> str | None:
        handle = self["prometheus"]
        return None if handle.state == "unavailable" else handle.url

    @property
    def grafana_url(self) -> str | None:
        handle = self["grafana"]
        return handle.url if handle.state == "running" else None

    def client_env(self) -> dict[str, str]:
        """Environment for MLflow and boto3 clients of these services."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": LOCAL_AWS_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": LOCAL_AWS_CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@dataclass(frozen=True)
class _Spec:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def start_local_services(
    root: Path = DEFAULT_ROOT,
    *,
    s3_port: int = DEFAULT_PORTS["s3"],
    mlflow_port: int = DEFAULT_PORTS["mlflow"],
    prometheus_port: int = DEFAULT_PORTS["prometheus"],
    with_prometheus: bool = True,
    # MLflow's first start (creating its tables) took over 90 s on a busy 2-core laptop.
    startup_timeout_s: float = 300.0,
    grafana_port: int | None = None,
) -> LocalServices:
    """Start whichever services are not already running under ``root`` and wait until each
    answers its health endpoint. A fresh S3 server gets the snapshot's objects and the MLflow
    artifact bucket. On failure, services started by this call are stopped again and
    ``LocalServicesError`` quotes the failing one's log."""
    root = Path(root).absolute()
    for sub in ("run", "logs", "s3", "mlflow", "prometheus/targets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    try:
        s3 = _Spec(
            "s3", s3_port, [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(s3_port)]
        )
        s3_url = _ensure_running(root, s3, startup_timeout_s, started)
        try:
            if "s3" in started:
                restore_s3(s3_url, root / "s3")
            _ensure_bucket(s3_url, MLFLOW_BUCKET)
        except (BotoCoreError, ClientError, OSError, SnapshotError) as exc:
            raise LocalServicesError(
                f"s3: loading the snapshot from {root / 's3'} or creating bucket "
                f"{MLFLOW_BUCKET} failed: {exc}"
            ) from exc
        _ensure_running(root, _mlflow_spec(root, mlflow_port, s3_url), startup_timeout_s, started)
        if with_prometheus and shutil.which("prometheus"):
            spec = _prometheus_spec(root, prometheus_port)
            _ensure_running(root, spec, startup_timeout_s, started)
        if grafana_port is not None:
            start_grafana(root, grafana_port, f"http://{LOOPBACK}:{prometheus_port}",
                          startup_timeout_s=startup_timeout_s, started=started)  # fmt: skip
    except BaseException:
        for name in reversed(started):  # no snapshot: the S3 server may be half-restored
            _stop(root, name, timeout_s=10.0)
        raise
    return local_services_status(root)


def stop_local_services(
    root: Path = DEFAULT_ROOT, *, timeout_s: float = 10.0, snapshot: bool = True
) -> LocalServices:
    """Stop every service under ``root`` (SIGTERM to its process group, SIGKILL after
    ``timeout_s``), saving the S3 snapshot after MLflow stops and before S3 does, unless
    ``snapshot`` is false. A failed snapshot raises with S3 still running."""
    root = Path(root).absolute()
    for name in ("grafana", "prometheus", "mlflow"):
        _stop(root, name, timeout_s)
    record = _read_record(root, "s3")
    if snapshot and record is not None and _is_alive(record):
        try:
            snapshot_s3(record["url"], root / "s3")
        except (BotoCoreError, ClientError, OSError, SnapshotError) as exc:
            raise LocalServicesError(
                f"s3: saving the snapshot to {root / 's3'} failed ({exc}); S3 is still running. "
                "Retry, or stop with --no-snapshot to drop what changed since the last one"
            ) from exc
    _stop(root, "s3", timeout_s)
    return local_services_status(root)


def start_grafana(
    root: Path,
    port: int,
    prometheus_url: str,
    *,
    startup_timeout_s: float = 300.0,
    started: list[str] | None = None,
) -> str | None:
    """Start Grafana (``workflows.local_grafana``) unless it runs; its URL, or None when this
    machine has no way to run it."""
    root = Path(root).absolute()
    launch = grafana_launch(root, port, prometheus_url)
    if launch is None:
        return None
    for sub in ("run", "logs", "grafana/data", "grafana/logs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # Pulling the image on a first container start takes a while: allow for it.
    timeout_s = startup_timeout_s * (2 if launch.how == "container" else 1)
    spec = _Spec("grafana", port, launch.argv, launch.env)
    return _ensure_running(root, spec, timeout_s, started if started is not None else [])


def stop_local_service(root: Path, name: str, *, timeout_s: float = 10.0) -> None:
    """Stop one service (no S3 snapshot); ``start_local_services`` starts it again."""
    if name not in SERVICE_NAMES:
        raise LocalServicesError(f"unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}")
    _stop(Path(root).absolute(), name, timeout_s)


def local_services_status(root: Path = DEFAULT_ROOT) -> LocalServices:
    """Each service's URL, pid and state, from its pid file and a health probe."""
    root = Path(root).absolute()
    return LocalServices(root, tuple(_status(root, name) for name in SERVICE_NAMES))


def _status(root: Path, name: str) -> ServiceHandle:
    log_path = root / "logs" / f"{name}.log"
    record = _read_record(root, name)
    url = record["url"] if record else f"http://{LOOPBACK}:{DEFAULT_PORTS[name]}"
    if record is None or not _is_alive(record):
        if name == "prometheus" and not shutil.which("prometheus"):
            detail = "skipped: no prometheus binary on PATH (apt-get install prometheus)"
            return ServiceHandle(name, "-", None, "unavailable", log_path, detail)
        if name == "grafana" and record is None and find_grafana() is None:
            return ServiceHandle(name, "-", None, "unavailable", log_path, GRAFANA_UNAVAILABLE)
        return ServiceHandle(name, url, None, "stopped", log_path)
    pid = int(record["pid"])
    if _is_healthy(url + _HEALTH_PATHS[name]):
        return ServiceHandle(name, url, pid, "running", log_path)
    return ServiceHandle(name, url, pid, "unhealthy", log_path, "health check failed")


def _mlflow_spec(root: Path, port: int, s3_url: str) -> _Spec:
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/",
        "--host", LOOPBACK, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": LOCAL_AWS_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": LOCAL_AWS_CREDENTIALS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        # The job runner (GenAI evaluation jobs) starts seven more processes Strata never uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return _Spec("mlflow", port, argv, env)


def _prometheus_spec(root: Path, port: int) -> _Spec:
    """Prometheus scrapes itself and every target listed in ``prometheus/targets/*.json``
    (file service discovery: local workers drop a file there to be scraped)."""
    rules = Path(__file__).resolve().parents[1] / "platform/monitoring/rules/strata-rules.yaml"
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(rules)] if rules.is_file() else [],
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"{LOOPBACK}:{port}"]}]},
            {
                "job_name": "strata",
                "file_sd_configs": [{"files": [str(root / "prometheus/targets/*.json")]}],
            },
        ],
    }
    config_path = root / "prometheus" / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    argv = [
        "prometheus",
        f"--config.file={config_path}",
        f"--storage.tsdb.path={root / 'prometheus' / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
    ]
    return _Spec("prometheus", port, argv)


def _ensure_running(root: Path, spec: _Spec, timeout_s: float, started: list[str]) -> str:
    """Start ``spec`` unless it already runs; wait for health. Returns its URL."""
    record = _read_record(root, spec.name)
    if record is not None and _is_alive(record):
        if record["port"] != spec.port:
            logger.warning(
                "%s already runs on port %s (not %s): `strata local down` to move it",
                spec.name, record["port"], spec.port,
            )  # fmt: skip
        _wait_healthy(record["url"] + _HEALTH_PATHS[spec.name], spec.name, root, is_running=None,
                      timeout_s=timeout_s)  # fmt: skip
        return str(record["url"])
    _check_port_free(spec)
    log_path = root / "logs" / f"{spec.name}.log"
    with log_path.open("a") as log:
        log.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} {' '.join(spec.argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=os.environ | spec.env,
            start_new_session=True,  # its own process group: survives us, stopped as a whole
        )
    started.append(spec.name)
    _write_record(root, spec, proc.pid)
    _wait_healthy(spec.url + _HEALTH_PATHS[spec.name], spec.name, root,
                  is_running=lambda: proc.poll() is None, timeout_s=timeout_s)  # fmt: skip
    return spec.url


def _check_port_free(spec: _Spec) -> None:
    with socket.socket() as sock:
        # As the servers do: a port in TIME_WAIT after a restart is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, spec.port))
        except OSError as exc:
            raise LocalServicesError(
                f"{spec.name}: port {spec.port} on {LOOPBACK} is taken by another process "
                f"({exc.strerror}); choose another with --{spec.name}-port"
            ) from exc


def _wait_healthy(
    url: str,
    name: str,
    root: Path,
    *,
    is_running: Callable[[], bool] | None,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if _is_healthy(url):
            return
        if is_running is not None and not is_running():
            raise LocalServicesError(f"{name} exited during startup:\n{_log_tail(root, name)}")
        if time.monotonic() > deadline:
            raise LocalServicesError(
                f"{name} did not answer {url} within {timeout_s:.0f} s:\n{_log_tail(root, name)}"
            )
        time.sleep(0.2)  # poll interval, bounded by the deadline above


def _is_healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _log_tail(root: Path, name: str, num_lines: int = 20) -> str:
    path = root / "logs" / f"{name}.log"
    try:
        lines = path.read_text(errors="replace").splitlines()[-num_lines:]
    except OSError:
        return f"(no log at {path})"
    return f"(last lines of {path})\n" + "\n".join(lines)


def _write_record(root: Path, spec: _Spec, pid: int) -> None:
    create_time = psutil.Process(pid).create_time()
    record = {"pid": pid, "port": spec.port, "url": spec.url, "create_time": create_time}
    (root / "run" / f"{spec.name}.json").write_text(json.dumps(record) + "\n")
    (root / "run" / f"{spec.name}.pid").write_text(f"{pid}\n")


def _read_record(root: Path, name: str) -> dict[str, Any] | None:
    """The last start's record; ``pid_file`` is where the pid file would be."""
    try:
        record = json.loads((root / "run" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return record | {"pid_file": str(root / "run" / f"{name}.pid")}


def _is_alive(record: dict[str, Any]) -> bool:
    """The pid file names the recorded process and it still runs (a reused pid has another
    start time)."""
    try:
        if int(Path(record["pid_file"]).read_text()) != record["pid"]:
            return False
        proc = psutil.Process(int(record["pid"]))
        return (
            abs(proc.create_time() - float(record["create_time"])) < 0.01
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.Error, OSError, KeyError, ValueError):
        return False


def _stop(root: Path, name: str, timeout_s: float) -> None:
    record = _read_record(root, name)
    if record is not None and _is_alive(record):
        _terminate_group(int(record["pid"]), timeout_s)
    (root / "run" / f"{name}.pid").unlink(missing_ok=True)


def _terminate_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM the process group, SIGKILL whatever remains after ``timeout_s``."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # reap it when this process started it
            if not _group_alive(pgid):
                return
            time.sleep(0.05)
    raise LocalServicesError(f"process group {pgid} survived SIGKILL")


def _group_alive(pgid: int) -> bool:
    try:
        members = [p for p in psutil.process_iter(["pid"]) if _pgid(p) == pgid]
    except psutil.Error:
        return True
    return any(_running(p) for p in members)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ensure_bucket(s3_url: str, bucket: str) -> None:
    client = make_s3_client(s3_url)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
