"""Schemathesis against the frontend's and a worker's own OpenAPI specs.

Every operation gets a bounded number of generated requests (``EXAMPLES``); each response must
be documented (status code, content type, headers, body schema), no response is a 5xx, and
every error is OpenAI's error JSON. Afterwards both servers are still healthy and serve a real
completion.

The operations that change the serving set (register, remove, drain a worker) are fuzzed on
their own (``test_frontend_control_routes``): besides random cases, valid cases aimed at a spare
worker (register it under fuzzed ids, models, versions, roles and KV endpoints; remove or drain
it under its real id), the set reset between cases, and the worker that serves the other
operations is never removed or drained.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
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
CONTROL = {
    ("POST", "/admin/workers"),
    ("DELETE", "/admin/workers/{worker_id}"),
    ("POST", "/admin/workers/{worker_id}/drain"),
}
SPARE_ID = "spare"
SEEN: dict[str, collections.Counter[str]] = {"frontend": collections.Counter(),
                                             "worker": collections.Counter()}  # fmt: skip
STATUSES: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


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


@pytest.fixture(scope="module")
def spare_worker(smollm2_dir: Path) -> Iterator[ThreadServer]:
    worker = mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=1000)
    yield worker
    worker.stop()


def _is_control(ctx: Any) -> bool:
    return (ctx.operation.method.upper(), ctx.operation.path) in CONTROL


def _load(url: str) -> Any:
    return schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(func=_is_control)


@pytest.fixture(scope="module")
def frontend_schema(fuzz_frontend: FrontendServer) -> Any:
    return _load(fuzz_frontend.url)


@pytest.fixture(scope="module")
def control_schema(fuzz_frontend: FrontendServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_frontend.url}/openapi.json").include(
        func=_is_control
    )


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


def _fuzz(
    server: str,
    schema: Any,
    aimed: Callable[[Any], Any] = _served_model,
    before: Callable[[Any], None] | None = None,
) -> None:
    """Each operation: ``EXAMPLES`` requests, valid and invalid (schemathesis' positive and
    negative generation) and valid ones ``aimed`` at something that exists, every response
    checked. ``before(case)`` runs before each call."""
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        strategy = st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE),
                             positive.map(aimed))  # fmt: skip

        @FUZZ
        @given(case=strategy)
        def run(case: Any) -> None:
            if before is not None:
                before(case)
            operation = f"{case.method} {case.path}"
            SEEN[server][operation] += 1
            response = case.call(timeout=60)
            STATUSES[f"{server} {operation}"][response.status_code] += 1
            case.validate_response(response, checks=CHECKS)
            openai_error_body(None, response, case)

        run()


@pytest.mark.slow
def test_frontend_spec(frontend_schema: Any) -> None:
    _fuzz("frontend", frontend_schema)


@pytest.mark.slow
def test_worker_spec(worker_schema: Any) -> None:
    _fuzz("worker", worker_schema)


class ControlCases:
    """Aims control-route cases at the spare worker and resets the serving set between them."""

    def __init__(self, frontend: FrontendServer, spare: ThreadServer, original: str) -> None:
        self.admin = httpx.Client(base_url=f"{frontend.url}/admin", timeout=60)
        self.spare, self.original = spare, original

    def aimed(self, case: Any) -> Any:
        if case.method.upper() == "POST" and case.path == "/admin/workers":
            if isinstance(case.body, dict):
                case.body = {**case.body, "url": self.spare.url}
        else:
            case.path_parameters = {**(case.path_parameters or {}), "worker_id": SPARE_ID}
        return case

    def before(self, case: Any) -> None:
        """Only the original worker left; the spare registered under ``SPARE_ID`` when the
        case removes or drains it; the original worker never removed nor drained."""
        self.reset()
        params = case.path_parameters or {}
        if params.get("worker_id") == self.original:
            case.path_parameters = {**params, "worker_id": f"not-{self.original}"}
        if params.get("worker_id") == SPARE_ID:
            added = self.admin.post("/workers", json={"url": self.spare.url,
                                                      "worker_id": SPARE_ID})  # fmt: skip
            assert added.status_code == 201, added.text

    def reset(self) -> None:
        for worker in self.admin.get("/workers").json()["workers"]:
            if worker["worker_id"] != self.original:
                assert self.admin.delete(f"/workers/{worker['worker_id']}").status_code == 200


@pytest.mark.slow
def test_frontend_control_routes(
    control_schema: Any, fuzz_frontend: FrontendServer, spare_worker: ThreadServer
) -> None:
    (original,) = [w.worker_id for _, v in fuzz_frontend.state.models.versions()
                   for w in v.pool.workers.values()]  # fmt: skip
    cases = ControlCases(fuzz_frontend, spare_worker, original)
    try:
        _fuzz("frontend", control_schema, cases.aimed, cases.before)
        # The spare was really registered, removed and drained along the way.
        for (method, path), ok in zip(sorted(CONTROL), (200, 201, 200), strict=True):
            assert STATUSES[f"frontend {method} {path}"][ok] > 0, (method, path)
    finally:
        cases.reset()
    (left,) = cases.admin.get("/workers").json()["workers"]
    assert left["worker_id"] == original and left["healthy"] and not left["draining"]


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
            statuses = dict(sorted(STATUSES[f"{server} {operation}"].items()))
            print(f"  {server:9s} {operation:40s} {num:4d}  statuses {statuses}")
