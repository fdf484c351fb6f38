"""Schemathesis against the frontend's and a worker's own OpenAPI specs.

Every operation gets a bounded number of generated requests (``EXAMPLES``); each response must
be documented (status code, content type, headers, body schema), no response is a 5xx, and
every error is OpenAI's error JSON. Afterwards both servers are still healthy and serve a real
completion. Operations that change the serving set (registering or removing workers) are
excluded here; ``test_frontend_routing.py`` and ``test_admission.py`` cover them by hand.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.frontend.conftest import FrontendServer, mock_worker_in_thread, start_frontend
from tests.worker.conftest import ThreadServer

MODEL = "smollm2-135m-instruct"
EXAMPLES = 30  # per operation and server
EXCLUDED = {
    ("POST", "/admin/workers"),
    ("DELETE", "/admin/workers/{worker_id}"),
    ("POST", "/admin/workers/{worker_id}/drain"),
    # Not documented yet (added by another engineer, uncommitted when this was written).
    ("GET", "/admin/workers/{worker_id}/kv_blocks"),
}
SEEN: dict[str, collections.Counter[str]] = {"frontend": collections.Counter(),
                                             "worker": collections.Counter()}  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_worker(smollm2_dir: Path) -> Iterator[ThreadServer]:
    worker = mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=1000)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def fuzz_frontend(smollm2_dir: Path, fuzz_worker: ThreadServer) -> Iterator[FrontendServer]:
    frontend = start_frontend(smollm2_dir, [fuzz_worker.url])
    yield frontend
    frontend.stop()


def _load(url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return schema.exclude(func=lambda ctx: (ctx.operation.method.upper(),
                                            ctx.operation.path) in EXCLUDED)  # fmt: skip


@pytest.fixture(scope="module")
def frontend_schema(fuzz_frontend: FrontendServer) -> Any:
    return _load(fuzz_frontend.url)


@pytest.fixture(scope="module")
def worker_schema(fuzz_worker: ThreadServer) -> Any:
    return _load(fuzz_worker.url)


def openai_error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is ``{"error": {"message": str, "type": str, ...}}``."""
    if response.status_code < 400:
        return None
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"error body is not OpenAI-style: {response.text[:200]}"
    assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip


def _served_model(case: Any) -> Any:
    """A valid request that names the served model: it reaches tokenization, admission,
    routing and the worker (random model names end at 404)."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body = {**case.body, "model": MODEL}
    return case


def _fuzz(server: str, schema: Any) -> None:
    """Each operation: ``EXAMPLES`` requests, valid and invalid (schemathesis' positive and
    negative generation), every response checked."""
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        strategy = st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE),
                             positive.map(_served_model))  # fmt: skip

        @FUZZ
        @given(case=strategy)
        def run(case: Any) -> None:
            SEEN[server][f"{case.method} {case.path}"] += 1
            response = case.call(timeout=60)
            case.validate_response(response, checks=CHECKS)
            openai_error_body(None, response, case)

        run()


@pytest.mark.slow
def test_frontend_spec(frontend_schema: Any) -> None:
    _fuzz("frontend", frontend_schema)


@pytest.mark.slow
def test_worker_spec(worker_schema: Any) -> None:
    _fuzz("worker", worker_schema)


def test_both_servers_stay_healthy_after_fuzzing(
    fuzz_frontend: FrontendServer, fuzz_worker: ThreadServer
) -> None:
    for url in (fuzz_frontend.url, fuzz_worker.url):
        assert httpx.get(f"{url}/health").status_code == 200
    done = httpx.post(f"{fuzz_frontend.base_url}/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})  # fmt: skip
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
    print("\nfuzzed examples per operation:")
    for server, counts in SEEN.items():
        for operation, num in sorted(counts.items()):
            print(f"  {server:9s} {operation:40s} {num}")
