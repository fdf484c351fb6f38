"""The deploy step's Kubernetes target: rendered manifests, and apply/wait/delete through the
official client against a recording fake API server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import kubernetes_validate
import pytest

from tests.workflows.fake_kube_api import APPLY, FakeKubeAPI, write_kubeconfig
from workflows.pipeline import PublishParams
from workflows.steps.deploy import DeployError
from workflows.steps.k8s_deploy import (
    apply_manifests,
    delete_deployment,
    delete_for_endpoint,
    deploy,
    make_api_client,
    wait_ready,
)
from workflows.steps.k8s_manifests import (
    endpoint_for,
    model_path_on_mount,
    render_worker_manifests,
    resource_name,
    service_from_endpoint,
)

client = pytest.importorskip("kubernetes.client", reason="the official kubernetes client")

MODEL = "smollm2-135m-instruct"
NAME = "strata-worker-smollm2-135m-instruct-v3"
NS = "team-a"
PARAMS = PublishParams(name=MODEL, cache_dir="/model-cache", deploy_target="kubernetes")
STAGED = Path("/model-cache/smollm2-135m-instruct-0123456789ab")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def render(params: PublishParams = PARAMS, version: str = "3", *, gpu: bool = True) -> list[dict]:
    return render_worker_manifests(
        params, version, STAGED, namespace=NS, image="registry/strata:1.2", pvc_name="cache",
        gpu=gpu,
    )  # fmt: skip


# --- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("k8s_version", ["1.33.0", kubernetes_validate.latest_version()])
def test_manifests_validate_strictly(gpu: bool, k8s_version: str) -> None:
    manifests = render(gpu=gpu)
    assert [m["kind"] for m in manifests] == ["Deployment", "Service"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, k8s_version, strict=True)


def test_deployment_runs_the_worker_from_the_read_only_model_cache() -> None:
    deployment, _ = render()
    assert deployment["metadata"]["name"] == NAME
    assert deployment["metadata"]["namespace"] == NS
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "strata-worker"
    assert (labels["strata.dev/model"], labels["strata.dev/model-version"]) == (MODEL, "3")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry/strata:1.2"
    assert container["command"] + container["args"] == [
        "strata", "worker",
        "--model", str(STAGED),
        "--engine", "builtin",
        "--host", "0.0.0.0",
        "--port", "8000",
        "--kv-events-port", "5557",
        "--served-model-name", MODEL,
        "--device", "cuda",
        "--drain-timeout", "30",
    ]  # fmt: skip
    drain_s = int(container["args"][container["args"].index("--drain-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] >= drain_s
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain_s  # survives a drain
    assert {"name": "model-cache", "mountPath": "/model-cache", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "cache",
            "readOnly": True}} in pod["volumes"]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_cpu_workers_ask_for_no_gpu() -> None:
    params = PublishParams(name=MODEL, cache_dir="/model-cache", engine="mock", num_workers=3)
    deployment, _ = render(params, gpu=False)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert "tolerations" not in pod
    assert not any("nvidia" in k for r in container["resources"].values() for k in r)
    args = container["args"]
    assert args[args.index("--device") + 1] == "cpu"
    assert args[args.index("--engine") + 1] == "mock"


def test_service_exposes_http_kv_events_and_replay() -> None:
    deployment, service = render()
    assert service["metadata"]["name"] == NAME
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8000, "http"), "kv-events": (5557, "kv-events"),
                     "kv-replay": (5558, "kv-replay")}  # fmt: skip
    container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["name"]: p["containerPort"] for p in container_ports} == {
        "http": 8000, "kv-events": 5557, "kv-replay": 5558}  # fmt: skip


def test_model_path_maps_the_local_cache_onto_the_mount(tmp_path: Path) -> None:
    params = PublishParams(name=MODEL, cache_dir=str(tmp_path / "cache"))
    staged = tmp_path / "cache" / "smollm2-abc"
    assert model_path_on_mount(params, staged) == "/model-cache/smollm2-abc"
    assert model_path_on_mount(PARAMS, STAGED) == str(STAGED)
    with pytest.raises(DeployError, match="not on the model cache"):
        model_path_on_mount(params, tmp_path / "elsewhere" / "m")
    with pytest.raises(DeployError, match="not on the model cache"):
        model_path_on_mount(PARAMS, Path("/model-cache"))


def test_names_are_dns_labels_and_endpoints_round_trip() -> None:
    assert resource_name(MODEL, "3") == NAME
    long = resource_name("Meta_Llama-3.1-70B-Instruct-with-a-very-long-suffix-indeed", "12")
    assert len(long) <= 63 and DNS_1035.match(long)
    assert long != resource_name("Meta_Llama-3.1-70B-Instruct-with-a-very-long-suffix-indeed", "13")
    endpoint = endpoint_for(NAME, NS)
    assert endpoint == f"http://{NAME}.{NS}.svc.cluster.local:8000"
    assert service_from_endpoint(endpoint) == (NAME, NS)
    assert service_from_endpoint("http://127.0.0.1:8001") is None


# --- the API server ---------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI(ready_after=3)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(fake: FakeKubeAPI) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=fake.url)) as api_client:
        yield api_client


def test_apply_uses_server_side_apply(fake: FakeKubeAPI, api: client.ApiClient) -> None:
    apply_manifests(render(), api_client=api)
    deployment_path = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
    service_path = f"/api/v1/namespaces/{NS}/services/{NAME}"
    assert fake.calls() == [("PATCH", deployment_path), ("PATCH", service_path)]
    for request in fake.requests:
        assert request.content_type == APPLY
        assert request.query["fieldManager"] == ["strata"]
        assert request.query["force"] == ["true"]
    assert fake.requests[0].body == render()[0]
    stored = fake.objects[("deployments", NS, NAME)]
    assert stored["metadata"]["generation"] == 1
    assert stored["metadata"]["managedFields"][0]["manager"] == "strata"

    apply_manifests(render(), api_client=api)  # idempotent: same spec, same generation
    assert fake.objects[("deployments", NS, NAME)]["metadata"]["generation"] == 1
    assert len(fake.objects) == 2


def test_wait_ready_polls_until_every_replica_is_ready(
    fake: FakeKubeAPI, api: client.ApiClient
) -> None:
    apply_manifests(render(), api_client=api)
    wait_ready(NAME, NS, 10.0, api, poll_s=0.01)
    status_path = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}/status"
    assert [c for c in fake.calls() if c[0] == "GET"] == [("GET", status_path)] * 3
    assert fake.objects[("deployments", NS, NAME)]["status"]["readyReplicas"] == 1


def test_wait_ready_gives_up_at_the_deadline(fake: FakeKubeAPI, api: client.ApiClient) -> None:
    fake.ready_after = 10**6
    apply_manifests(render(), api_client=api)
    with pytest.raises(DeployError, match=rf"{NAME} not ready after 0 s \(0/1 replicas ready\)"):
        wait_ready(NAME, NS, 0.2, api, poll_s=0.01)
    assert sum(c[0] == "GET" for c in fake.calls()) > 1


def test_wait_ready_fails_fast_on_a_stalled_rollout(
    fake: FakeKubeAPI, api: client.ApiClient
) -> None:
    fake.stall = True
    apply_manifests(render(), api_client=api)
    with pytest.raises(DeployError, match="stalled: rollout: ProgressDeadlineExceeded"):
        wait_ready(NAME, NS, 60.0, api, poll_s=0.01)


def test_wait_ready_on_a_missing_deployment_names_it(api: client.ApiClient) -> None:
    with pytest.raises(DeployError, match=f"reading Deployment {NS}/{NAME}: 404"):
        wait_ready(NAME, NS, 1.0, api, poll_s=0.01)


def test_delete_removes_deployment_and_service(fake: FakeKubeAPI, api: client.ApiClient) -> None:
    apply_manifests(render(), api_client=api)
    delete_deployment(NAME, NS, api)
    assert fake.calls()[-2:] == [
        ("DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"),
        ("DELETE", f"/api/v1/namespaces/{NS}/services/{NAME}"),
    ]
    assert fake.requests[-1].query["propagationPolicy"] == ["Background"]
    assert fake.objects == {}
    delete_deployment(NAME, NS, api)  # already gone: fine


def test_delete_for_endpoint_finds_the_deployment_by_service_labels(
    fake: FakeKubeAPI, api: client.ApiClient
) -> None:
    apply_manifests(render(version="3"), api_client=api)
    apply_manifests(render(version="4"), api_client=api)
    deleted = delete_for_endpoint(endpoint_for(NAME, NS), api)
    assert deleted == [NAME]
    list_call = next(r for r in fake.requests if r.path.endswith("/deployments"))
    assert list_call.query["labelSelector"] == [
        f"app.kubernetes.io/name=strata-worker,strata.dev/model={MODEL},strata.dev/model-version=3"
    ]
    remaining = {key[2] for key in fake.objects}
    assert remaining == {resource_name(MODEL, "4")}
    assert delete_for_endpoint(endpoint_for(NAME, NS), api) == []  # Service gone: nothing
    with pytest.raises(DeployError, match="not a cluster Service URL"):
        delete_for_endpoint("http://127.0.0.1:8000", api)


def test_deploy_applies_then_waits(fake: FakeKubeAPI, api: client.ApiClient) -> None:
    name, endpoint = deploy(
        PARAMS, "3", STAGED, namespace=NS, image="img", pvc_name="cache", gpu=False,
        api_client=api, timeout_s=30, poll_s=0.01,
    )  # fmt: skip
    assert (name, endpoint) == (NAME, f"http://{NAME}.{NS}.svc.cluster.local:8000")
    assert [m for m, _ in fake.calls()] == ["PATCH", "PATCH", "GET", "GET", "GET"]


def test_the_fake_enforces_the_api_contract(fake: FakeKubeAPI) -> None:
    """The fake refuses what a real API server refuses, so the client tests above mean it."""
    url = f"{fake.url}/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
    body = render()[0]
    apply_headers = {"Content-Type": APPLY}
    merge = httpx.patch(url, json=body, params={"fieldManager": "strata"})
    assert merge.status_code == 415
    no_manager = httpx.request("PATCH", url, json=body, headers=apply_headers)
    assert (no_manager.status_code, no_manager.json()["reason"]) == (422, "Invalid")
    renamed = {**body, "metadata": {**body["metadata"], "name": "other"}}
    wrong_name = httpx.request(
        "PATCH", url, json=renamed, headers=apply_headers, params={"fieldManager": "strata"}
    )
    assert wrong_name.status_code == 400 and "does not match" in wrong_name.json()["message"]
    as_service = {**body, "apiVersion": "v1", "kind": "Service"}
    wrong_kind = httpx.request(
        "PATCH", url, json=as_service, headers=apply_headers, params={"fieldManager": "strata"}
    )
    assert wrong_kind.status_code == 400
    assert httpx.get(url).status_code == 404
    assert fake.objects == {}


def test_api_errors_carry_the_object_and_the_server_message(
    fake: FakeKubeAPI, api: client.ApiClient
) -> None:
    deployment, _ = render()
    deployment["metadata"]["namespace"] = "Not_A_Namespace"  # the URL pattern refuses it
    with pytest.raises(DeployError, match=r"applying Deployment Not_A_Namespace/.*: 404"):
        apply_manifests([deployment], api_client=api)
    with pytest.raises(DeployError, match="only Deployment and Service"):
        apply_manifests([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}], api_client=api)


def test_api_client_from_kubeconfig_outside_a_cluster(
    fake: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, fake.url)))
    api_client = make_api_client()
    assert api_client.configuration.host == fake.url
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(DeployError, match="no Kubernetes credentials"):
        make_api_client()
