"""Discovery backends and a frontend restart under load.

With a watched workers file and with Kubernetes EndpointSlices (a recording fake API server
that streams watch events), a frontend killed under load and started again finds every
worker, has its KV index rebuilt from the workers' event replay before it reports ready
(prefix hits return), and no request sent after readiness fails. The sources also follow
changes: a worker that leaves the list (or turns not-ready) is dropped, one that comes back
is added, and a 410 Gone watch re-lists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from kubernetes import client as kube_client

from serving.engine.config import EngineConfig
from serving.frontend.discovery import DiscoverySource
from serving.frontend.discovery.file import FileSource
from serving.frontend.discovery.kubernetes import KubernetesSource
from serving.worker.app import create_app
from serving.worker.config import WorkerConfig
from serving.worker.server import build_state
from tests.frontend.conftest import FrontendServer, mock_worker_in_thread, start_frontend
from tests.frontend.fake_endpointslices import FakeEndpointSlices, slice_for
from tests.worker.conftest import ThreadServer, free_port

MODEL = "smollm2-135m-instruct"
PREFIXES = [[2000 + 11 * p + i for i in range(128)] for p in range(4)]


@pytest.fixture(scope="module")
def workers(smollm2_dir: Path) -> Iterator[list[ThreadServer]]:
    servers = [mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=50) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Load:
    """Small completions sent back to back from a thread: (sent at, succeeded) each."""

    url: str
    results: list[tuple[float, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    body = {"model": MODEL, "prompt": [7, 8, 9 + i % 50], "max_tokens": 3}
                    ok = http.post(f"{self.url}/v1/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.results.append((sent, ok))
                i += 1
                time.sleep(0.01)

    def failed_after(self, t: float) -> list[float]:
        return [sent for sent, ok in self.results if sent >= t and not ok]


def cached_tokens(url: str, prompt: list[int]) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    usage = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"]


def restart_under_load(
    smollm2_dir: Path, make_source: Callable[[], DiscoverySource], expected_urls: set[str]
) -> FrontendServer:
    """Serve prefixes through one frontend, kill it under load, start another on the same
    port; check workers, index and requests after readiness. Returns the new frontend."""
    port = free_port()
    first = start_frontend(smollm2_dir, [], port=port, require_workers=False,
                           discovery_source=make_source())  # fmt: skip
    wait_for(lambda: is_ready(first.url), "the first frontend to be ready")
    for prefix in PREFIXES:
        cached_tokens(first.url, [*prefix, 1])
    wait_for(lambda: sum(len(v.router.indexer) for _, v in first.state.models.versions()) >= 32,
             "the prefixes in the first frontend's index")  # fmt: skip
    load = Load(first.url)
    sender = threading.Thread(target=load.run, daemon=True)
    sender.start()
    try:
        wait_for(lambda: len(load.results) >= 5, "load on the first frontend")
        first.kill()  # under load: requests in flight are cut
        second = start_frontend(smollm2_dir, [], port=port, require_workers=False,
                                discovery_source=make_source())  # fmt: skip
        wait_for(lambda: is_ready(second.url), "the restarted frontend to be ready")
        ready_at = time.monotonic()
        # Ready means: every worker known and its KV events replayed into the index.
        assert {w.url for w in second.state.models.workers()} == expected_urls
        indexed = sum(len(v.router.indexer) for _, v in second.state.models.versions())
        assert indexed >= len(PREFIXES) * 128 // 16, indexed
        for prefix in PREFIXES:
            assert cached_tokens(second.url, [*prefix, 2]) == 128  # prefix hits return
        wait_for(lambda: len([r for r in load.results if r[0] > ready_at]) >= 20,
                 "load on the restarted frontend")  # fmt: skip
    finally:
        load.stop.set()
        sender.join(30)
    assert load.failed_after(ready_at) == []
    return second


def test_file_discovery_survives_a_frontend_restart(
    smollm2_dir: Path, workers: list[ThreadServer], tmp_path: Path
) -> None:
    listing = tmp_path / "workers.yaml"
    entries = "".join(f"  - {{url: {w.url}, model: {MODEL}, id: w{i}}}\n"
                      for i, w in enumerate(workers))  # fmt: skip
    listing.write_text("workers:\n" + entries)

    def source() -> DiscoverySource:
        return FileSource(listing, poll_interval_s=0.05)

    frontend = restart_under_load(smollm2_dir, source, {w.url for w in workers})
    try:
        listing.write_text("workers:\n" + entries.splitlines(keepends=True)[0])  # one leaves
        wait_for(lambda: [w.url for w in frontend.state.models.workers()] == [workers[0].url],
                 "the dropped worker to leave")  # fmt: skip
        listing.write_text("workers: [{url: nope}]\n")  # a bad file keeps the last list
        time.sleep(0.3)  # several polls: nothing may change
        assert [w.url for w in frontend.state.models.workers()] == [workers[0].url]
        listing.write_text("workers:\n" + entries)  # it comes back
        wait_for(lambda: len(list(frontend.state.models.workers())) == 2, "the worker's return")
    finally:
        frontend.stop()


@pytest.fixture
def kube() -> Iterator[FakeEndpointSlices]:
    fake = FakeEndpointSlices()
    fake.start()
    yield fake
    fake.stop()


def worker_slice(i: int, worker: ThreadServer, *, ready: bool = True) -> dict:
    """The EndpointSlice of worker ``i``'s Service (one pod)."""
    health = worker.state.extra_health
    ports = {"http": int(worker.url.rsplit(":", 1)[1]), "kv-events": health["kv_events_port"],
             "kv-replay": health["kv_events_replay_port"]}  # fmt: skip
    return slice_for(f"worker-{i}-abcde", "127.0.0.1", ports, model=MODEL, ready=ready)


def test_kubernetes_discovery_survives_a_frontend_restart(
    smollm2_dir: Path, workers: list[ThreadServer], kube: FakeEndpointSlices
) -> None:
    for i, worker in enumerate(workers):
        kube.apply("strata", worker_slice(i, worker))
    # Another component's slice in the namespace: the label selector keeps it out.
    other = slice_for("frontend-xyz", "127.0.0.1", {"http": 1}, model=MODEL)
    other["metadata"]["labels"]["app.kubernetes.io/component"] = "frontend"
    kube.apply("strata", other)

    def source() -> DiscoverySource:
        api = kube_client.ApiClient(kube_client.Configuration(host=kube.url))
        return KubernetesSource("strata", api_client=api, watch_timeout_s=2)

    frontend = restart_under_load(smollm2_dir, source, {w.url for w in workers})
    try:
        lists = [q for m, p, q in kube.requests if "watch" not in q]
        assert lists and all(q["labelSelector"] == ["app.kubernetes.io/component=worker"]
                             for q in lists)  # fmt: skip
        assert kube.watches() >= 2  # both frontends watched from their list's version
        # A pod turns not ready: its worker leaves; ready again: it is back.
        kube.apply("strata", worker_slice(1, workers[1], ready=False))
        wait_for(lambda: len(list(frontend.state.models.workers())) == 1, "the not-ready pod")
        kube.compact()  # the next watch from an old version gets 410 Gone: list again
        kube.apply("strata", worker_slice(1, workers[1]))
        wait_for(lambda: len(list(frontend.state.models.workers())) == 2, "the pod's return")
        kube.delete("strata", "worker-0-abcde")  # its Service deleted
        wait_for(lambda: [w.url for w in frontend.state.models.workers()] == [workers[1].url],
                 "the deleted slice's worker to leave")  # fmt: skip
    finally:
        frontend.stop()


def test_a_static_worker_dropped_by_health_checks_comes_back(smollm2_dir: Path) -> None:
    """A listed worker (``--worker-url``, a local worker of ``strata serve``) that died long
    enough to be dropped is registered again when its restarted process answers."""
    worker = mock_worker_in_thread(smollm2_dir, name=MODEL, speedup=50)
    port = int(worker.url.rsplit(":", 1)[1])
    frontend = start_frontend(smollm2_dir, [worker.url])
    restarted = None
    try:
        worker.stop()
        wait_for(lambda: not list(frontend.state.models.workers()), "the dead worker to go")
        config = uvicorn.Config(create_app(build_state(WorkerConfig(
            engine=EngineConfig(model_dir=smollm2_dir, engine="mock", speedup=50),
            kv_events_port=0, kv_events_host="127.0.0.1", served_model_name=[MODEL],
        ))), host="127.0.0.1", port=port, log_level="warning")  # fmt: skip
        restarted = uvicorn.Server(config)
        threading.Thread(target=restarted.run, daemon=True).start()
        wait_for(lambda: is_ready(frontend.url), "the restarted worker to be back")
        assert cached_tokens(frontend.url, [1, 2, 3]) == 0  # it serves again
        # An operator's DELETE is final: the static list does not bring it back.
        (found,) = frontend.state.models.workers()
        assert httpx.delete(f"{frontend.url}/admin/workers/{found.worker_id}").status_code == 200
        time.sleep(1.5)  # a reconcile pass (every 1 s) at least
        assert not list(frontend.state.models.workers())
    finally:
        frontend.stop()
        if restarted is not None:
            restarted.should_exit = True
