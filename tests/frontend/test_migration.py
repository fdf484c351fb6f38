"""A worker dies mid-stream: the client still gets one complete, identical stream."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.frontend.conftest import start_frontend
from tests.worker.conftest import free_port, metric, scrape, start_worker_process, wait_healthy

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def running(url: str) -> float:
    try:
        return metric(scrape(url), "vllm:num_requests_running")
    except httpx.HTTPError:
        return 0.0


def test_migration_keeps_the_stream_identical(smollm2_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(smollm2_dir), "--kv-events-port", "0", "--served-model-name", MODEL]
    workers = [start_worker_process(args, tmp_path / f"w{i}.log") for i in range(2)]
    frontend = start_frontend(smollm2_dir, [w.url for w in workers])
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        request = dict(model=MODEL, messages=PROMPT, max_tokens=48, temperature=0,
                       extra_body={"ignore_eos": True})  # fmt: skip
        reference = client.chat.completions.create(**request)
        stream = client.chat.completions.create(**request, stream=True)
        text, token_ids, killed = "", [], None
        for chunk in stream:
            if not chunk.choices:
                continue
            text += chunk.choices[0].delta.content or ""
            token_ids += chunk.choices[0].model_extra.get("token_ids") or []
            if killed is None and len(token_ids) >= 10:
                # Kill the worker that is serving this request, mid-stream.
                killed = next(w for w in workers if running(w.url) > 0)
                killed.proc.send_signal(signal.SIGKILL)
                killed.proc.wait()
        assert killed is not None
        assert token_ids == reference.choices[0].model_extra["token_ids"]
        assert text == reference.choices[0].message.content
        values = scrape(frontend.url)
        assert metric(values, "strata_frontend_migrations_total") == 1
        # The dead worker is out of routing (removed after failed health checks) and its
        # blocks are gone from the index.
        pool, indexer = frontend.pool(), frontend.router().indexer
        assert [w.url for w in pool.workers.values() if w.healthy] == [
            w.url for w in workers if w is not killed
        ]
        live_ids = {w.worker_id for w in pool.workers.values() if w.healthy}
        assert set(indexer.worker_ids()) <= live_ids
        again = client.chat.completions.create(**request)
        assert again.choices[0].model_extra["token_ids"] == token_ids
    finally:
        frontend.stop()
        for worker in workers:
            worker.stop()


def test_migration_limit_gives_a_clean_error(smollm2_dir: Path, tmp_path: Path) -> None:
    worker = start_worker_process(
        ["--model", str(smollm2_dir), "--engine", "mock", "--served-model-name", MODEL],
        tmp_path / "w.log",
    )
    frontend = start_frontend(smollm2_dir, [worker.url])
    try:
        client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
        stream = client.completions.create(
            model=MODEL, prompt=[1, 2, 3], max_tokens=2000, stream=True
        )
        with pytest.raises(openai.APIError):
            for i, _ in enumerate(stream):
                if i == 2:
                    worker.proc.send_signal(signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as no_workers:
            client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
        assert no_workers.value.status_code == 503
    finally:
        frontend.stop()
        worker.stop()


def test_strata_serve_starts_and_stops_everything(smollm2_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--model", str(smollm2_dir),
         "--workers", "2", "--engine", "mock", "--port", str(port),
         "--worker-arg=--speedup=50", "--log-level", "warning"],
        stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600)  # minutes at load 20+ on 2 cores
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
        assert out.usage.completion_tokens == 5
        workers = httpx.get(f"{url}/admin/workers").json()["workers"]
        assert len(workers) == 2 and all(w["healthy"] for w in workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        for worker in workers:  # strata serve stopped them itself
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{worker['url']}/health")
    finally:
        # After a failure: whatever is left of its process group (workers of a killed serve).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "endpoint: http://127.0.0.1" in (tmp_path / "serve.log").read_text()
