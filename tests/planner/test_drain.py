"""Scale-down without losing a request: the frontend's drain (``POST /admin/workers/{id}/drain``)
and the local connector over a real frontend and real mock workers served in this process
(they start in a second; ``test_step_load.py`` does the same through ``strata serve``)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from serving.planner.config import DrainConfig
from serving.planner.connectors.frontend_admin import FrontendAdmin
from serving.planner.connectors.local import LocalConnector
from tests.frontend.conftest import FrontendServer, mock_worker_in_thread, start_frontend
from tests.worker.conftest import ThreadServer

MODEL = "smollm2-135m-instruct"
ADMIN_KEY = "admin-key-for-tests"
MAX_TOKENS = 40


@dataclass
class InProcessWorker:
    url: str
    worker_id: str
    role: str
    server: ThreadServer


class InProcessSupervisor:
    """The supervisor protocol over mock workers served in threads of this process."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.ids = itertools.count(1)
        self.running: list[InProcessWorker] = []
        self.stopped: list[str] = []

    def spawn(self, role: str) -> InProcessWorker:
        server = mock_worker_in_thread(self.model_dir, name=MODEL, speedup=4)
        worker = InProcessWorker(server.url, f"local-{next(self.ids)}", role, server)
        self.running.append(worker)
        return worker

    def wait_worker_healthy(self, worker: InProcessWorker, timeout_s: float) -> None:
        try:
            httpx.get(f"{worker.url}/health", timeout=timeout_s).raise_for_status()
        except httpx.HTTPError as exc:  # the supervisor's contract: RuntimeError
            raise RuntimeError(f"{worker.worker_id} not healthy: {exc}") from exc

    def stop_worker(self, worker: InProcessWorker, timeout_s: float) -> None:
        worker.server.stop()
        self.running.remove(worker)
        self.stopped.append(worker.worker_id)


@pytest.fixture
def stack(
    smollm2_dir: Path,
) -> Iterator[tuple[FrontendServer, InProcessSupervisor, InProcessWorker]]:
    supervisor = InProcessSupervisor(smollm2_dir)
    first = supervisor.spawn("both")
    first.worker_id = "local-0"
    frontend = start_frontend(smollm2_dir, [f"{first.url};id=local-0"], router="least-loaded",
                              admin_key=ADMIN_KEY)  # fmt: skip
    yield frontend, supervisor, first
    frontend.stop()
    for worker in list(supervisor.running):
        supervisor.stop_worker(worker, 10)


def stream(client: openai.OpenAI, i: int) -> int:
    """One streamed completion to its end; the output tokens its usage chunk reports."""
    chunks = client.completions.create(
        model=MODEL, prompt=[100 + i] * 30, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    return usage[-1].completion_tokens if usage else 0


def test_drained_worker_gets_no_new_requests_and_finishes_its_streams(stack) -> None:  # type: ignore[no-untyped-def]
    frontend, supervisor, _ = stack
    admin = FrontendAdmin(frontend.url, ADMIN_KEY)
    second = supervisor.spawn("both")
    admin.register(second.url, "both", second.worker_id, MODEL)
    client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(stream, client, i) for i in range(8)]
        # Both workers stream; drain the first while its streams run.
        frontend_workers = lambda: {w["worker_id"]: w for w in admin.workers()}  # noqa: E731
        assert_soon(lambda: frontend_workers()["local-0"]["active_requests"] > 0)
        drained = admin.drain("local-0")
        assert drained["draining"] is True and drained["active_requests"] > 0
        later = [pool.submit(stream, client, 100 + i) for i in range(6)]
        assert [f.result() for f in running + later] == [MAX_TOKENS] * 14  # nothing lost
    routed = frontend.router().load
    assert_soon(lambda: routed.num_active_requests("local-0") == 0)
    workers = frontend_workers()
    assert workers["local-0"]["draining"] and workers["local-0"]["active_requests"] == 0
    assert not workers[second.worker_id]["draining"]
    # Every request sent after the drain went to the other worker.
    assert frontend.pool().decode_ids() == [second.worker_id]
    with pytest.raises(Exception, match="HTTP 404"):
        admin.drain("no-such-worker")
    unauthorised = httpx.post(f"{frontend.url}/admin/workers/local-0/drain", timeout=5)
    assert unauthorised.status_code == 401


def test_local_connector_scales_up_then_drains_without_losing_a_stream(stack) -> None:  # type: ignore[no-untyped-def]
    frontend, supervisor, first = stack
    connector = LocalConnector(
        supervisor, FrontendAdmin(frontend.url, ADMIN_KEY), ("both",), model=MODEL,
        drain=DrainConfig(deadline_s=30, poll_s=0.05), initial=[first],
    )  # fmt: skip
    connector.set_replicas("both", 3)
    counts = connector.replica_counts()["both"]
    assert (counts.ready + counts.starting, counts.draining) == (3, 0)
    lead_times = list(counts.lead_times_s)  # each scale-up's time is reported once
    assert connector.wait_idle(60)
    counts = connector.replica_counts()["both"]
    assert (counts.ready, counts.starting) == (3, 0)
    assert len(lead_times + list(counts.lead_times_s)) == 2
    assert len(frontend.pool().decode_ids()) == 3
    client = openai.OpenAI(base_url=frontend.base_url, api_key="x", max_retries=0)
    with ThreadPoolExecutor(12) as pool:
        running = [pool.submit(stream, client, i) for i in range(12)]
        assert_soon(lambda: sum(w["active_requests"] for w in connector.frontend.workers()) >= 6)
        connector.set_replicas("both", 1)  # two drains while every worker streams
        assert connector.replica_counts()["both"].draining == 2
        later = [pool.submit(stream, client, 50 + i) for i in range(6)]
        tokens = [f.result() for f in running + later]
    assert tokens == [MAX_TOKENS] * 18  # zero lost streams across both scale-downs
    assert connector.wait_idle(60)
    counts = connector.replica_counts()["both"]
    assert (counts.ready, counts.starting, counts.draining) == (1, 0, 0)
    assert len(supervisor.stopped) == 2 and len(supervisor.running) == 1
    assert [w["worker_id"] for w in connector.frontend.workers()] == [
        supervisor.running[0].worker_id
    ]
    kinds = [event for event, _, _ in connector.events]
    assert kinds.count("start") == 2 and kinds.count("ready") == 2
    assert kinds.count("drain") == 2 and kinds.count("stopped") == 2


def test_scale_down_cancels_a_worker_still_starting(stack) -> None:  # type: ignore[no-untyped-def]
    frontend, supervisor, first = stack
    connector = LocalConnector(
        supervisor, FrontendAdmin(frontend.url, ADMIN_KEY), ("both",), model=MODEL,
        drain=DrainConfig(deadline_s=30, poll_s=0.05), initial=[first],
    )  # fmt: skip
    gate = __import__("threading").Event()
    original = supervisor.wait_worker_healthy
    supervisor.wait_worker_healthy = lambda w, t: (gate.wait(30), original(w, t))  # type: ignore[method-assign]
    connector.set_replicas("both", 2)
    assert connector.replica_counts()["both"].starting == 1
    connector.set_replicas("both", 1)
    gate.set()
    assert connector.wait_idle(30)
    assert connector.replica_counts()["both"].current == 1
    assert [e for e, _, _ in connector.events] == ["start", "cancel"]
    assert [w["worker_id"] for w in connector.frontend.workers()] == ["local-0"]  # never routed


def assert_soon(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")
