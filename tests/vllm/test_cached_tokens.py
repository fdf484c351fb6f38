"""``cached_tokens`` reaches the client when a worker does not report it (stock vLLM started
without ``--enable-prompt-tokens-details``): the frontend reports the router's prediction.

A mock-engine worker in this process stands in for such a vLLM: an ASGI wrapper removes
``prompt_tokens_details`` from everything it answers (fast: no vLLM process).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from serving.engine.config import EngineConfig
from serving.netutil import free_port, wait_healthy
from serving.worker.app import create_app
from serving.worker.config import WorkerConfig
from serving.worker.server import build_state
from tests.frontend.conftest import start_frontend
from tests.worker.conftest import wait_until

MODEL = "smollm2-135m-instruct"
BLOCK_SIZE = 16
_DETAILS = re.compile(rb',\s*"prompt_tokens_details"\s*:\s*(\{[^{}]*\}|null)')


class _WithoutPromptDetails:
    """ASGI wrapper: the worker's answers without ``prompt_tokens_details``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def strip(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                message = {**message, "body": _DETAILS.sub(b"", message.get("body", b""))}
            await send(message)

        await self.app(scope, receive, strip)


@pytest.fixture(scope="module")
def silent_worker(smollm2_dir: Path) -> Iterator[str]:
    config = WorkerConfig(
        engine=EngineConfig(model_dir=smollm2_dir, engine="mock", speedup=50),
        kv_events_port=0,
        kv_events_host="127.0.0.1",
        served_model_name=[MODEL],
    )
    app = _WithoutPromptDetails(create_app(build_state(config)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout_s=60)
    yield url
    server.should_exit = True
    thread.join(60)


def test_frontend_reports_predicted_cached_tokens(smollm2_dir: Path, silent_worker: str) -> None:
    prompt = list(range(1000, 1000 + 5 * BLOCK_SIZE + 3))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    direct = httpx.post(f"{silent_worker}/v1/completions", json=body, timeout=60).json()
    assert "prompt_tokens_details" not in direct["usage"]  # the stand-in reports nothing
    frontend = start_frontend(smollm2_dir, [silent_worker])
    try:
        wait_until(lambda: len(frontend.router().indexer) >= 5, "the prompt's blocks indexed")
        again = httpx.post(f"{frontend.url}/v1/completions", json=body, timeout=60).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 5 * BLOCK_SIZE
        other = {**body, "prompt": [p + 7 for p in prompt]}
        fresh = httpx.post(f"{frontend.url}/v1/completions", json=other, timeout=60).json()
        assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        frontend.stop()
