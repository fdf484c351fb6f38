"""Worker fixtures: a real ``strata worker`` process, or the same app served in a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from serving.netutil import free_port, wait_healthy
from serving.worker.app import create_app
from serving.worker.state import WorkerState

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerProcess:
    url: str
    proc: subprocess.Popen
    health: dict
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


WORKER_STARTUP_S = 600.0


def start_worker_process(args: list[str], log_path: Path) -> WorkerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "serving.worker", "--port", str(port), *args]
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Generous: importing torch and loading a model took ~4 min at load 10 on 2 cores.
        health = wait_healthy(url, proc, timeout_s=WORKER_STARTUP_S)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"worker failed to start:\n{log_path.read_text()[-3000:]}") from None
    return WorkerProcess(url=url, proc=proc, health=health, log_path=log_path)


@dataclass
class ThreadServer:
    url: str
    state: WorkerState
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def serve_in_thread(state: WorkerState) -> ThreadServer:
    """The worker app in this process (tests can inspect the engine), on a free port."""
    port = free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout_s=60)
    return ThreadServer(url=url, state=state, server=server, thread=thread)


@pytest.fixture(scope="session")
def smollm2_worker(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One real SmolLM2 worker process (CPU, float32) with KV events, shared by API tests."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = start_worker_process(
        ["--model", str(smollm2_dir), "--kv-events-port", "0", "--log-level", "warning"], log
    )
    yield worker
    worker.stop()


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {series: value} (labels included in the key)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str) -> float:
    """Sum of every series of ``name`` (any labels)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def labelled(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` carrying every given label value."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in values.items() if k.startswith(name + "{") and all(w in k for w in wanted)
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll a condition with a deadline (for effects observed, not slept for)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
