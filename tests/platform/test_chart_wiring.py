"""The serving chart wired to the code it runs: the planner's Role is exactly what its Kubernetes
connector calls (recorded against the scaling fake API server), the frontend's discovery Role
and the worker Services are what the EndpointSlice discovery calls and reads, the planner's
config and command line are what ``strata planner`` parses, and the KV-tier volumes and
flags agree. The environment is ``p5-disagg-efa`` (planner, discovery and KV tiers on)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tests.platform.conftest import Rendered, render_with

pytest.importorskip("kubernetes.client", reason="the official kubernetes client")

ENV = "p5-disagg-efa"
RELEASE, NAMESPACE, MODEL = "llama3-70b", "strata", "llama-3-70b-instruct"
PLANNER = f"{RELEASE}-strata-planner"
FRONTEND = f"{RELEASE}-strata-frontend"


def by_component(rendered: Rendered, kind: str, component: str) -> list[dict[str, Any]]:
    return [
        o
        for o in rendered.of_kind(kind)
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]


def pod_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource, verb, resourceName or None) of every grant."""
    return {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }


def render_strata(release: str = RELEASE, **strata: Any) -> Rendered:
    """Only the serving chart of the environment, with ``strata`` values merged (fast)."""
    return render_with(ENV, release=release, strata=strata, karpenter=None, storage=None,
                       workflows=None)  # fmt: skip


# --- the planner -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planner_config(rendered_envs: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory):
    """The rendered planner ConfigMap's config as ``strata planner --config`` parses it."""
    from serving.planner.config import load_config

    (config_map,) = by_component(rendered_envs[ENV], "ConfigMap", "planner")
    path = tmp_path_factory.mktemp("planner") / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return load_config(path)


def test_planner_command_line_and_config_parse_with_the_planner_cli(
    rendered_envs: dict[str, Rendered], planner_config: Any, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    import serving.planner.cli as planner_cli

    rendered = rendered_envs[ENV]
    (deployment,) = by_component(rendered, "Deployment", "planner")
    c = pod_container(deployment)
    assert c["command"] == ["strata"] and c["args"][0] == "planner"
    (config_map,) = by_component(rendered, "ConfigMap", "planner")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"]["config.yaml"])
    seen: list[Any] = []

    def build_runner(cfg: Any, admin_key: str | None) -> Any:
        seen.append((cfg, admin_key))
        raise ValueError("stop here")

    monkeypatch.setattr(planner_cli, "build_runner", build_runner)
    args = [f"--config={config_file}" if a.startswith("--config=") else a for a in c["args"][1:]]
    app = typer.Typer()
    app.command()(planner_cli.planner)
    result = CliRunner().invoke(app, args, env={"STRATA_ADMIN_KEY": "k"})
    assert result.exit_code == 2 and "error: stop here" in result.output, result.output
    ((cfg, admin_key),) = seen
    assert cfg == planner_config and admin_key == "k"
    # The file is mounted where --config points, and the admin key is the frontend's.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert any(a == f"--config={mounts['config']}/config.yaml" for a in c["args"])
    (frontend,) = by_component(rendered, "Deployment", "frontend")
    admin_env = [e for e in pod_container(frontend)["env"] if e["name"] == "STRATA_ADMIN_KEY"]
    assert [e for e in c["env"] if e["name"] == "STRATA_ADMIN_KEY"] == admin_env != []
    # What the config says about the cluster.
    assert cfg.connector.kind == "kubernetes" and cfg.connector.kubernetes.in_cluster
    assert cfg.connector.kubernetes.namespace == NAMESPACE
    assert cfg.metrics.kind == "prometheus"
    assert cfg.metrics.frontend_url == f"http://{FRONTEND}.{NAMESPACE}.svc:80"
    assert cfg.model == MODEL and cfg.mode == "act"
    assert cfg.profile == Path("/model-cache/llama-3-70b-instruct/strata-profile.json")
    assert {r: (c.min_replicas, c.max_replicas) for r, c in cfg.roles.items()} == {
        "prefill": (1, 4), "decode": (2, 8)
    }  # fmt: skip
    assert cfg.roles["decode"].lead_time.estimate_s == 480
    assert cfg.sla.ttft_s == 1.0 and cfg.max_total_gpus == 48
    assert c["ports"] == [{"name": "metrics", "containerPort": cfg.metrics_port, "protocol": "TCP"}]


def test_planner_selects_exactly_one_worker_deployment_per_role(
    rendered_envs: dict[str, Rendered], planner_config: Any
) -> None:
    from serving.planner.connectors.kubernetes import COMPONENT_SELECTOR, ROLE_LABEL

    rendered = rendered_envs[ENV]
    for role in planner_config.roles:
        terms = [COMPONENT_SELECTOR, f"{ROLE_LABEL}={role}",
                 planner_config.connector.kubernetes.extra_selector]  # fmt: skip
        wanted = dict(t.split("=") for t in terms)
        matches = [
            d["metadata"]["name"]
            for d in rendered.of_kind("Deployment")
            if wanted.items() <= d["metadata"]["labels"].items()
        ]
        assert matches == [f"{RELEASE}-strata-worker-{role}"], role


@pytest.fixture
def cluster(rendered_envs: dict[str, Rendered], tmp_path: Path) -> Iterator[Any]:
    """The scaling fake API server holding the release's worker Deployments as rendered."""
    from tests.planner.fake_kube_scale import ScalingFakeKubeAPI
    from tests.planner.test_kubernetes_connector import FrontendStub

    fake = ScalingFakeKubeAPI()
    server = fake.start()
    for deployment in by_component(rendered_envs[ENV], "Deployment", "worker"):
        name = deployment["metadata"]["name"]
        body = {**deployment, "metadata": {**deployment["metadata"], "namespace": NAMESPACE}}
        with fake._lock:
            fake._store("Deployment", ("deployments", NAMESPACE, name), body, "Update", "helm")
            fake._reconcile_pods(NAMESPACE, name)
    frontend = FrontendStub()
    frontend.start()
    for i, pod in enumerate(fake.pods.values()):
        frontend.workers[f"w{i}"] = {
            "worker_id": f"w{i}", "url": f"http://{pod['status']['podIP']}:8000",
            "role": pod["metadata"]["labels"]["strata.dev/role"], "healthy": True,
            "draining": False, "active_requests": 0,
        }  # fmt: skip
    yield fake, frontend, server
    frontend.stop()
    fake.stop()


def test_planner_role_grants_exactly_what_the_connector_calls(
    rendered_envs: dict[str, Rendered], planner_config: Any, cluster: Any, tmp_path: Path
) -> None:
    """Scale decode up, drain a prefill pod and scale it down, with the rendered config; the
    Role must allow each recorded call and nothing that was not called."""
    from serving.planner.config import DrainConfig
    from serving.planner.connectors.frontend_admin import FrontendAdmin
    from serving.planner.connectors.kubernetes import KubernetesConnector, make_api_client
    from tests.planner.fake_kube_scale import POD_PATH, SCALE_PATH
    from tests.planner.test_kubernetes_connector import ADMIN_KEY
    from tests.workflows.fake_kube_api import write_kubeconfig

    fake, frontend, server = cluster
    kube = planner_config.connector.kubernetes.model_copy(
        update={"in_cluster": False, "kubeconfig": write_kubeconfig(tmp_path, server)}
    )
    connector = KubernetesConnector(
        kube, tuple(planner_config.roles), drain=DrainConfig(deadline_s=10, poll_s=0.02),
        frontend=FrontendAdmin(frontend.url, ADMIN_KEY), api_client=make_api_client(kube),
    )  # fmt: skip
    counts = connector.replica_counts()
    assert (counts["prefill"].ready, counts["decode"].ready) == (2, 4)
    connector.set_replicas("decode", 5)
    connector.set_replicas("prefill", 1)
    assert connector.wait_for_drains(timeout_s=20)
    assert len(fake.pods_of(f"{RELEASE}-strata-worker-prefill")) == 1
    assert len(fake.pods_of(f"{RELEASE}-strata-worker-decode")) == 5

    used = set()
    for request in fake.requests:
        verb = {"GET": "get", "PATCH": "patch"}[request.method]
        if scale := SCALE_PATH.match(request.path):
            used.add(("apps", "deployments/scale", verb, scale["name"]))
        elif pod := POD_PATH.match(request.path):
            used.add(("", "pods", "list" if pod["name"] is None else verb, None))
        else:
            assert request.path == f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
            assert request.method == "GET" and "watch" not in request.query
            used.add(("apps", "deployments", "list", None))
    role = rendered_envs[ENV].named("Role", PLANNER)
    assert rules_of(role) == used
    binding = rendered_envs[ENV].named("RoleBinding", PLANNER)
    assert binding["roleRef"]["name"] == PLANNER
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": PLANNER, "namespace": NAMESPACE}
    ]
    (deployment,) = by_component(rendered_envs[ENV], "Deployment", "planner")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == PLANNER
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_inline_profile_goes_into_the_config_map_and_bad_values_are_named() -> None:
    from serving.planner.profile import PerfProfile
    from tests.planner.conftest import formula_profile
    from workflows.platform_cli import PlatformError

    profile = formula_profile().model_dump(mode="json")
    rendered = render_strata(planner={"profilePath": "", "profile": profile})
    (config_map,) = by_component(rendered, "ConfigMap", "planner")
    assert PerfProfile.model_validate_json(config_map["data"]["profile.json"]) == formula_profile()
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["profile"] == "/etc/strata/planner/profile.json"
    (deployment,) = by_component(rendered, "Deployment", "planner")
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes == {"config", "tmp"}  # no model cache needed
    # Wrong keys reach no pod: the chart's schema or the planner's own config names them.
    cases = [
        ({"config": {"sla": {"ttft": 1}}}, "config.yaml: sla.ttft: Extra inputs are not permitted"),
        ({"config": {"roles": {}}}, "at '/planner/config': additional properties 'roles'"),
        ({"roles": {"decode": {"gpus_per_replica": 2}}}, "at '/planner/roles/decode/gpus_per"),
        ({"roles": {"both": {"min_replicas": 1}}}, "planner.roles.both: no worker pool"),
        ({"roles": {"decode": {"min_replicas": 9}}}, "min_replicas 9 > max_replicas 8"),
        ({"profilePath": ""}, "at '/planner'"),
        ({"profilePath": "", "profile": {**profile, "prefill": []}}, "profile.json"),
    ]
    for planner, message in cases:
        with pytest.raises(PlatformError, match=message.replace("(", r"\(")):
            render_strata(planner=planner)
    two_decode_pools = [
        {"name": "prefill", "role": "prefill", "replicas": 1, "nodePool": "gpu-prefill"},
        {"name": "decode", "role": "decode", "replicas": 1, "nodePool": "gpu-decode"},
        {"name": "decode-b", "role": "decode", "replicas": 1, "nodePool": "gpu-decode"},
    ]
    with pytest.raises(PlatformError, match='more than one pool has role "decode"'):
        render_strata(workers={"pools": two_decode_pools})


# --- discovery ---------------------------------------------------------------------------------


def endpoint_slices(rendered: Rendered) -> list[dict[str, Any]]:
    """What the EndpointSlice controller writes for each worker Service: the Service's labels
    plus its own, the ports by name with the pods' container port numbers, one ready pod."""
    deployments = {d["metadata"]["name"]: d for d in by_component(rendered, "Deployment", "worker")}
    slices = []
    for i, service in enumerate(by_component(rendered, "Service", "worker")):
        name = service["metadata"]["name"]
        selector = service["spec"]["selector"]
        (deployment,) = [
            d for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        container_ports = {
            p["name"]: p["containerPort"] for p in pod_container(deployment)["ports"]
        }
        slices.append({
            "metadata": {
                "name": f"{name}-x{i}",
                "labels": {**service["metadata"]["labels"], "kubernetes.io/service-name": name,
                           "endpointslice.kubernetes.io/managed-by":
                           "endpointslice-controller.k8s.io"},
            },
            "addressType": "IPv4",
            "ports": [{"name": p["name"], "port": container_ports[p["targetPort"]],
                       "protocol": "TCP"} for p in service["spec"]["ports"]],
            "endpoints": [{"addresses": [f"10.1.0.{i + 1}"],
                           "conditions": {"ready": True, "serving": True, "terminating": False},
                           "targetRef": {"kind": "Pod", "name": f"{name}-pod",
                                         "namespace": NAMESPACE}}],
        })  # fmt: skip
    return slices


def test_discovery_role_and_worker_services_match_what_the_frontend_reads(
    rendered_envs: dict[str, Rendered],
) -> None:
    from kubernetes import client as kube_client

    from serving.frontend.discovery.kubernetes import KubernetesSource
    from tests.frontend.fake_endpointslices import FakeEndpointSlices

    rendered = rendered_envs[ENV]
    (frontend,) = by_component(rendered, "Deployment", "frontend")
    args = dict(a.split("=", 1) for a in pod_container(frontend)["args"][1:])
    assert args["--discovery"] == "kubernetes" and "--worker-url" not in args
    fake = FakeEndpointSlices()
    fake.start()
    try:
        for item in endpoint_slices(rendered):
            fake.apply(NAMESPACE, item)
        other = endpoint_slices(render_strata("other"))[0]  # another release
        fake.apply(NAMESPACE, {**other, "metadata": {**other["metadata"], "name": "other-x"}})
        api = kube_client.ApiClient(kube_client.Configuration(host=fake.url))
        source = KubernetesSource(args["--kube-namespace"], args["--kube-selector"],
                                  api_client=api, watch_timeout_s=2)  # fmt: skip
        published: list[list[Any]] = []

        async def discover() -> None:
            async def publish(specs: list[Any]) -> None:
                published.append(specs)

            task = asyncio.create_task(source.run(publish))
            while not published or fake.watches() < 1:
                await asyncio.sleep(0.02)
            task.cancel()

        asyncio.run(asyncio.wait_for(discover(), 30))
        requests = list(fake.requests)
    finally:
        fake.stop()
    specs = {s.url: s for s in published[0]}
    pools = {p["name"]: p for p in rendered.env.strata["workers"]["pools"]}
    assert sorted((s.role, s.model, s.version) for s in specs.values()) == sorted(
        (p["role"], MODEL, "3") for p in pools.values()
    )
    for spec in specs.values():
        host = spec.url.removeprefix("http://").split(":")[0]
        assert (spec.url, spec.kv_events_endpoint, spec.replay_endpoint) == (
            f"http://{host}:8000", f"tcp://{host}:5557", f"tcp://{host}:5558"
        )  # fmt: skip
    used = {("discovery.k8s.io", "endpointslices", "watch" if "watch" in q else "list", None)
            for _, _, q in requests}  # fmt: skip
    assert all(q["labelSelector"] == [args["--kube-selector"]] for _, _, q in requests)
    role = rendered.named("Role", f"{FRONTEND}-discovery")
    assert rules_of(role) == used
    binding = rendered.named("RoleBinding", f"{FRONTEND}-discovery")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FRONTEND, "namespace": NAMESPACE}
    ]
    pod = frontend["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FRONTEND and pod["automountServiceAccountToken"] is True


# --- KV tiers, policies ------------------------------------------------------------------------


def test_kv_tier_volumes_requests_and_s3_settings(rendered_envs: dict[str, Rendered]) -> None:
    from workflows.platform_cli import PlatformError

    tiers = rendered_envs[ENV].env.strata["kvTiers"]
    for deployment in by_component(rendered_envs[ENV], "Deployment", "worker"):
        c = pod_container(deployment)
        pod = deployment["spec"]["template"]["spec"]
        args = dict(a.split("=", 1) if "=" in a else (a, "") for a in c["args"][1:])
        assert args["--kv-s3-uri"] == f"{tiers['s3Uri']}/{MODEL}"
        assert float(args["--kv-host-gib"]) == tiers["hostGiB"]
        assert float(args["--kv-disk-gib"]) == tiers["diskGiB"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "kv-disk"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["kv-disk"]["mountPath"] == args["--kv-disk-dir"]
        size = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
        assert (
            tiers["diskGiB"] * 1.1
            < size
            == int(c["resources"]["requests"]["ephemeral-storage"].removesuffix("Gi"))
        )
        # The G2 tier fits the memory limit and, as a shared-memory segment, /dev/shm beside
        # the worker's own use; the region reaches boto3.
        assert int(c["resources"]["limits"]["memory"].removesuffix("Gi")) > tiers["hostGiB"]
        (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        shm_gib = int(dshm["emptyDir"]["sizeLimit"].removesuffix("Gi"))
        assert shm_gib >= tiers["hostGiB"] + 16 and mounts["dshm"]["mountPath"] == "/dev/shm"
        assert {"name": "AWS_REGION", "value": tiers["s3Region"]} in c["env"]
    with pytest.raises(PlatformError, match=r"kvTiers.hostGiB \(300\) does not fit in .*200Gi"):
        render_strata(kvTiers={"hostGiB": 300})
    off = rendered_envs["g6-aggregated"]
    for deployment in by_component(off, "Deployment", "worker"):
        assert not any(a.startswith(("--kv-host", "--kv-disk", "--kv-s3"))
                       for a in pod_container(deployment)["args"])  # fmt: skip
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in volumes


def test_frontend_admits_the_planner_and_the_planner_only_prometheus() -> None:
    rendered = render_strata(networkPolicy={"frontendFromNamespaces": ["apps"]})
    frontend = rendered.named("NetworkPolicy", f"{RELEASE}-strata-frontend")
    (rule,) = frontend["spec"]["ingress"]
    planner_pods = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "planner"}
    assert {"podSelector": {"matchLabels": planner_pods}} in rule["from"]
    planner = rendered.named("NetworkPolicy", f"{RELEASE}-strata-planner")
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert planner["spec"]["ingress"] == [
        {
            "from": [{"namespaceSelector": {"matchLabels": monitoring}}],
            "ports": [{"port": "metrics", "protocol": "TCP"}],
        }
    ]
    (pod_monitor,) = rendered.of_kind("PodMonitor")
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["http", "metrics"]
