"""Local deployments and the production switch: no request is dropped while switching."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from tests.frontend.conftest import start_frontend
from tests.workflows.fake_kube_api import FakeKubeAPI, write_kubeconfig
from workflows.pipeline import PublishParams
from workflows.steps.deploy import (
    DeployError,
    deploy_candidate,
    list_deployments,
    stop_deployment,
    switch_production,
)

MODEL = "smollm2-135m-instruct"


def test_switch_production_drops_no_request(smollm2_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "deployments"
    params = PublishParams(name=MODEL, engine="mock")
    old = deploy_candidate(params, "1", smollm2_dir, root=root)
    new = deploy_candidate(params, "2", smollm2_dir, root=root)
    assert deploy_candidate(params, "2", smollm2_dir, root=root) == new  # reused while healthy
    frontend = start_frontend(smollm2_dir, [old.endpoint])
    switched = threading.Event()
    try:

        async def load() -> list[tuple[str | None, int]]:
            async with openai.AsyncOpenAI(
                base_url=frontend.base_url, api_key="x", max_retries=0, timeout=120
            ) as client:

                async def one(i: int) -> tuple[str | None, int]:
                    stream = await client.completions.create(
                        model=MODEL, prompt=[10 + i] * 20, max_tokens=150, stream=True
                    )
                    finish, num_tokens = None, 0
                    async for chunk in stream:
                        num_tokens += len(chunk.choices[0].model_extra["token_ids"] or [])
                        finish = chunk.choices[0].finish_reason or finish
                        if num_tokens >= 5 and i == 0 and not switched.is_set():
                            switched.set()
                            await asyncio.to_thread(
                                switch_production, frontend.url, new.endpoint, MODEL, root=root
                            )
                    return finish, num_tokens

                return list(await asyncio.gather(*(one(i) for i in range(12))))

        results = asyncio.run(load())
        assert switched.is_set()
        assert results == [("length", 150)] * 12
        workers = httpx.get(f"{frontend.url}/admin/workers").json()["workers"]
        assert [w["url"] for w in workers] == [new.endpoint]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{old.endpoint}/health")
        assert [d.name for d in list_deployments(root)] == [new.name]
    finally:
        frontend.stop()
        for deployment in list_deployments(root):
            stop_deployment(deployment)


def test_unknown_target_is_a_clear_error(tmp_path: Path) -> None:
    params = PublishParams(name=MODEL, deploy_target="nomad")
    with pytest.raises(DeployError, match="unknown deploy target 'nomad'"):
        deploy_candidate(params, "1", tmp_path, root=tmp_path)


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeAPI]:
    """A fake API server reached the way a workflow pod outside a cluster would: kubeconfig."""
    pytest.importorskip("kubernetes", reason="the official kubernetes client")
    fake = FakeKubeAPI(ready_after=1)
    fake.start()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, fake.url)))
    yield fake
    fake.stop()


def test_kubernetes_target_applies_and_waits(
    kube: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATA_K8S_NAMESPACE", "serving")
    monkeypatch.setenv("STRATA_IMAGE", "registry.example/strata:7")
    monkeypatch.setenv("STRATA_MODEL_CACHE_PVC", "fsx-cache")
    cache = tmp_path / "cache"
    params = PublishParams(name=MODEL, cache_dir=str(cache), deploy_target="kubernetes")
    deployment = deploy_candidate(params, "1", cache / "smollm2-abc", root=tmp_path / "d")
    name = f"strata-worker-{MODEL}-v1"
    assert deployment.name == name
    assert deployment.endpoint == f"http://{name}.serving.svc.cluster.local:8000"
    assert deployment.pids == ()
    assert not (tmp_path / "d").exists()  # no local state for cluster deployments
    assert [m for m, _ in kube.calls()] == ["PATCH", "PATCH", "GET"]
    pod = kube.objects[("deployments", "serving", name)]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/strata:7"
    assert container["args"][container["args"].index("--model") + 1] == "/model-cache/smollm2-abc"
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "fsx-cache",
                                                          "readOnly": True}  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # builtin engine: a GPU


def test_switch_production_deletes_the_old_kubernetes_deployment(
    kube: FakeKubeAPI, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    params = PublishParams(name=MODEL, cache_dir=str(cache), deploy_target="kubernetes",
                           engine="mock")  # fmt: skip
    old = deploy_candidate(params, "1", cache / "a", root=tmp_path)
    new = deploy_candidate(params, "2", cache / "b", root=tmp_path)
    frontend = FakeFrontend([old.endpoint])
    try:
        removed = switch_production(frontend.url, new.endpoint, MODEL, root=tmp_path)
    finally:
        frontend.stop()
    assert removed == ["w0"]
    assert [w["url"] for w in frontend.workers.values()] == [new.endpoint]
    assert {key[2] for key in kube.objects} == {new.name}  # old Deployment and Service gone
    deletes = [path for method, path in kube.calls() if method == "DELETE"]
    assert deletes == [
        f"/apis/apps/v1/namespaces/strata/deployments/{old.name}",
        f"/api/v1/namespaces/strata/services/{old.name}",
    ]


class FakeFrontend:
    """The frontend's ``/admin/workers`` API, recording registrations (no routing)."""

    def __init__(self, urls: list[str]) -> None:
        self.workers = {f"w{i}": {"worker_id": f"w{i}", "url": u} for i, u in enumerate(urls)}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._reply(200, {"workers": list(fake.workers.values())})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                worker = {"worker_id": f"w{len(fake.workers)}", "url": body["url"]}
                fake.workers[worker["worker_id"]] = worker
                self._reply(201, worker)

            def do_DELETE(self) -> None:
                self._reply(200, fake.workers.pop(self.path.rsplit("/", 1)[-1]))

            def _reply(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_exit_handler_deletes_only_the_runs_kubernetes_deployment(
    kube: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleanup step of a failed cluster run deletes the Deployment and Service labelled
    with its publish run (the Argo workflow uid), and leaves other versions alone."""
    from workflows.steps.lifecycle import cleanup_step

    cache = tmp_path / "cache"
    base = {"name": MODEL, "cache_dir": str(cache), "deploy_target": "kubernetes",
            "engine": "mock", "mlflow_tracking_uri": "http://127.0.0.1:9"}  # fmt: skip
    production = deploy_candidate(PublishParams(**base, run_id="uid-1"), "1", cache / "a",
                                  root=tmp_path)  # fmt: skip
    failed = PublishParams(**base, run_id="uid-2")
    candidate = deploy_candidate(failed, "2", cache / "b", root=tmp_path)
    labels = kube.objects[("deployments", "strata", candidate.name)]["metadata"]["labels"]
    assert labels["strata.dev/publish-run"] == "uid-2"
    # MLflow is unreachable here (port 9; no client retries): the run's status decides alone.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = cleanup_step(failed, status="Failed")
    assert out["removed"] == [candidate.name] and out["undone"] == ["deploy"]
    assert {key[2] for key in kube.objects} == {production.name}
    assert cleanup_step(PublishParams(**base, run_id="uid-1"), status="Succeeded")["removed"] == []
