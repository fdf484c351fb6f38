"""The charts under platform/, rendered by the Helm SDK for the three example environments
(aggregated on g6, 2 prefill + 4 decode on p5 with EFA, p6-b200) and checked offline: strict
Kubernetes schemas for two versions, the CRDs' schemas with unknown fields rejected, helm lint
--strict, node pools, EFA requests, labels, network policies, monitoring objects."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from tests.platform.conftest import (
    CRD_FILES,
    ENVIRONMENTS,
    ENVIRONMENTS_DIR,
    REPO_ROOT,
    Rendered,
    render_with,
)
from workflows import platform_cli
from workflows.platform_cli import CHARTS, PLATFORM_DIR, PlatformError, chart_values

K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {kind for _, kind in CRD_FILES} | {"WorkflowTemplate"}


def components(rendered: Rendered, kind: str = "Deployment") -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in rendered.of_kind(kind)}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (found,) = deployment["spec"]["template"]["spec"]["containers"]
    return found


def workers(rendered: Rendered) -> list[dict[str, Any]]:
    return [
        d
        for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]


# --- every object validates --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_core_objects_pass_strict_kubernetes_schemas(
    rendered_envs: dict[str, Rendered], env: str, k8s_version: str
) -> None:
    core = [o for o in rendered_envs[env].objects if o["kind"] not in CUSTOM_KINDS]
    kinds = {o["kind"] for o in core}
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap",
            "PersistentVolumeClaim", "StorageClass", "ServiceAccount", "Role",
            "RoleBinding"} <= kinds  # fmt: skip
    for obj in core:
        kubernetes_validate.validate(obj, k8s_version, strict=True)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_custom_resources_pass_their_crd_schemas(
    rendered_envs: dict[str, Rendered],
    env: str,
    crd_validator: Callable[[dict], list[str]],
    argo_validator: Callable[[dict], list[str]],
) -> None:
    rendered = rendered_envs[env]
    custom = [o for o in rendered.objects if o["kind"] in CUSTOM_KINDS]
    assert {o["kind"] for o in custom} == CUSTOM_KINDS
    for obj in custom:
        validate = argo_validator if obj["kind"] == "WorkflowTemplate" else crd_validator
        assert validate(obj) == [], (obj["kind"], obj["metadata"]["name"])


def test_crd_validation_rejects_unknown_and_misplaced_fields(
    rendered_envs: dict[str, Rendered], crd_validator: Callable[[dict], list[str]]
) -> None:
    nodepool = rendered_envs["p5-disagg-efa"].named("NodePool", "gpu-prefill")
    nodepool["spec"]["template"]["spec"]["instanceFamily"] = "p5"  # not a NodePool field
    assert any("instanceFamily" in e for e in crd_validator(nodepool))
    del nodepool["spec"]["template"]["spec"]["instanceFamily"]
    nodepool["spec"]["disruption"]["consolidationPolicy"] = "Sometimes"
    assert any("consolidationPolicy" in e for e in crd_validator(nodepool))
    nodepool["spec"]["disruption"]["consolidationPolicy"] = "WhenEmpty"
    assert crd_validator(nodepool) == []


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_charts_pass_helm_lint_strict(rendered_envs: dict[str, Rendered], env: str) -> None:
    rendered = rendered_envs[env]
    for section, values in chart_values(rendered.env).items():
        report = helm_python.lint(
            PLATFORM_DIR / CHARTS[section], values, strict=True, namespace=rendered.env.namespace
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert problems == [], (section, problems)


# --- broken values are rejected, naming the field ---------------------------------------------


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {
                "strata": {
                    "workers": {
                        "pools": [{"name": "x", "role": "prefil", "replicas": 1, "nodePool": "gpu"}]
                    }
                }
            },
            "section 'strata' (strata chart): values don't meet the specifications",
        ),
        ({"strata": {"workers": {"gpuFamily": "p6b200"}}}, "at '/workers/gpuFamily'"),
        ({"strata": {"frontend": {"replicas": "two"}}}, "at '/frontend/replicas'"),
        ({"strata": {"workers": {"efa": "maybe"}}}, "at '/workers/efa'"),
        ({"strata": {"kvTiers": {"s3Uri": "s3:/kv"}}}, "at '/kvTiers/s3Uri'"),
        ({"strata": {"planner": {"mode": "auto"}}}, "at '/planner/mode'"),
        ({"strata": {"modle": {"name": "x"}}}, "'modle' not allowed"),
        (
            {
                "karpenter": {
                    "gpuPools": [
                        {
                            "name": "gpu",
                            "role": "decode",
                            "families": ["p6"],
                            "capacityTypes": ["on-demand"],
                            "limits": {},
                        }
                    ]
                }
            },
            "at '/gpuPools/0/families/0'",
        ),
        (
            {
                "karpenter": {
                    "gpuPools": [
                        {
                            "name": "gpu",
                            "role": "decode",
                            "families": ["p5", "g6"],
                            "capacityTypes": ["on-demand"],
                            "limits": {},
                        }
                    ]
                }
            },
            "mix EFA and non-EFA instances",
        ),
        ({"storage": {"fsx": {"mountName": ""}}}, "fsx.mountName is required"),
        ({"workflows": {"mlflowTrackingUri": "mlflow:5000"}}, "at '/mlflowTrackingUri'"),
    ],
)
def test_broken_values_are_rejected_naming_the_field(sections: dict, message: str) -> None:
    with pytest.raises(PlatformError) as caught:
        render_with("p5-disagg-efa", **sections)
    assert message in str(caught.value)


def test_render_cli_writes_every_file_and_rejects_a_broken_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "strata").mkdir(parents=True)
    (out / "strata" / "stale.yaml").write_text("kind: Gone\n")
    values = ENVIRONMENTS_DIR / "p5-disagg-efa.yaml"
    result = CliRunner().invoke(
        platform_cli.app, ["render", "--values", str(values), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.yaml"))
    assert "strata/stale.yaml" not in written
    assert {"strata/workers.yaml", "strata-karpenter/nodepools.yaml",
            "strata-storage/model-cache.yaml", "strata-workflows/workflowtemplates.yaml",
            "argo-workflows/values.yaml"} <= set(written)  # fmt: skip
    broken = tmp_path / "broken.yaml"
    text = values.read_text().replace("role: decode, replicas: 4", "role: decode, replicas: -1")
    broken.write_text(text)
    result = CliRunner().invoke(platform_cli.app, ["render", "--values", str(broken), "-o", "x"])
    assert result.exit_code == 2
    assert "at '/workers/pools/1/replicas'" in result.output
    assert str(broken) not in {str(p) for p in tmp_path.iterdir() if p.name == "x"}
    broken.write_text(text.replace("release: llama3-70b", "relase: llama3-70b"))
    result = CliRunner().invoke(platform_cli.app, ["render", "--values", str(broken), "-o", "x"])
    assert result.exit_code == 2
    assert "relase: Extra inputs are not permitted" in result.output


# --- node pools and EFA -----------------------------------------------------------------------


def requirement(nodepool: dict[str, Any], key: str) -> list[str]:
    reqs = nodepool["spec"]["template"]["spec"]["requirements"]
    (found,) = [r for r in reqs if r["key"] == key]
    assert found["operator"] == "In"
    return found["values"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("g6-aggregated", {"gpu-decode": ["g6"], "cpu": ["m7i", "m7a", "c7i", "c7a"]}),
        (
            "p5-disagg-efa",
            {"gpu-prefill": ["p5"], "gpu-decode": ["p5"], "cpu": ["m7i", "m7a", "c7i", "c7a"]},
        ),
        ("p6-b200", {"gpu-b200": ["p6-b200"], "cpu": ["m7i", "m7a", "c7i", "c7a"]}),
    ],
)
def test_node_pools_select_exactly_the_listed_families(
    rendered_envs: dict[str, Rendered], env: str, expected: dict[str, list[str]]
) -> None:
    pools = components(rendered_envs[env], "NodePool")
    assert {n: requirement(p, "karpenter.k8s.aws/instance-family") for n, p in pools.items()} == (
        expected
    )
    for name, pool in pools.items():
        keys = {r["key"] for r in pool["spec"]["template"]["spec"]["requirements"]}
        # Nothing else narrows or widens the family choice (no category/generation/name rules).
        assert keys == {"karpenter.k8s.aws/instance-family", "karpenter.sh/capacity-type",
                        "kubernetes.io/arch", "kubernetes.io/os"}, name  # fmt: skip
        labels = pool["spec"]["template"]["metadata"]["labels"]
        assert labels["strata.dev/pool"] == name
        if name != "cpu":
            assert labels["strata.dev/efa"] == ("false" if env == "g6-aggregated" else "true")
            assert pool["spec"]["template"]["spec"]["nodeClassRef"]["name"] == "strata-gpu"


def test_gpu_node_class_hardening(rendered_envs: dict[str, Rendered]) -> None:
    for cls in rendered_envs["p5-disagg-efa"].of_kind("EC2NodeClass"):
        spec = cls["spec"]
        assert spec["metadataOptions"]["httpTokens"] == "required"
        assert spec["metadataOptions"]["httpPutResponseHopLimit"] == 1
        assert all(b["ebs"]["encrypted"] for b in spec["blockDeviceMappings"])
        assert spec["amiSelectorTerms"][0]["alias"].startswith("al2023@v")  # pinned, not @latest
        assert spec["subnetSelectorTerms"] == [{"tags": {"karpenter.sh/discovery": "strata-prod"}}]
    gpu = rendered_envs["p5-disagg-efa"].named("EC2NodeClass", "strata-gpu")
    assert gpu["spec"]["instanceStorePolicy"] == "RAID0"


@pytest.mark.parametrize(
    ("env", "pool", "efa_request", "efa_flag"),
    [
        ("g6-aggregated", "both", None, "off"),
        ("p5-disagg-efa", "prefill", "4", "required"),
        ("p5-disagg-efa", "decode", "4", "required"),
        ("p6-b200", "prefill", "1", "required"),
        ("p6-b200", "decode", "1", "fallback"),
    ],
)
def test_workers_on_efa_pools_request_efa(
    rendered_envs: dict[str, Rendered], env: str, pool: str, efa_request: str | None, efa_flag: str
) -> None:
    rendered = rendered_envs[env]
    (deployment,) = [
        d for d in workers(rendered) if d["metadata"]["labels"]["strata.dev/worker-pool"] == pool
    ]
    c = container(deployment)
    for section in ("requests", "limits"):
        assert c["resources"][section].get("vpc.amazonaws.com/efa") == efa_request
        assert c["resources"][section]["nvidia.com/gpu"] == "1"
    assert f"--efa={efa_flag}" in c["args"]
    pod = deployment["spec"]["template"]["spec"]
    family = rendered.env.strata["workers"]["gpuFamily"]
    assert pod["nodeSelector"]["karpenter.k8s.aws/instance-family"] == family
    # The pod's pool exists and lists its family: Karpenter can place it.
    nodepool = rendered.named("NodePool", pod["nodeSelector"]["strata.dev/pool"])
    assert family in requirement(nodepool, "karpenter.k8s.aws/instance-family")


def test_efa_families_agree_between_charts() -> None:
    strata = yaml.safe_load((PLATFORM_DIR / "helm/strata/values.yaml").read_text())
    karpenter = yaml.safe_load((PLATFORM_DIR / "karpenter/values.yaml").read_text())
    assert {f: v["efaPerGpu"] > 0 for f, v in strata["gpuFamilies"].items()} == {
        f: v["efa"] for f, v in karpenter["gpuFamilies"].items()
    }


# --- labels, policies, budgets, monitoring -------------------------------------------------------


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_components_and_roles_are_labelled(rendered_envs: dict[str, Rendered], env: str) -> None:
    rendered = rendered_envs[env]
    expected = {("frontend", None)} | {
        ("worker", p["role"]) for p in rendered.env.strata["workers"]["pools"]
    }
    if rendered.env.strata.get("planner", {}).get("enabled"):
        expected.add(("planner", None))
    seen = set()
    for deployment in rendered.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels.items() >= deployment["spec"]["selector"]["matchLabels"].items()
        seen.add((labels["app.kubernetes.io/component"], labels.get("strata.dev/role")))
    assert seen == expected


def test_workers_accept_traffic_only_from_frontend_planner_workers_and_prometheus(
    rendered_envs: dict[str, Rendered],
) -> None:
    rendered = rendered_envs["p5-disagg-efa"]
    policy = rendered.named("NetworkPolicy", "llama3-70b-strata-workers")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers, metrics = policy["spec"]["ingress"]
    assert "ports" not in peers  # KV transfer (NIXL/UCX) uses more than the listed ports
    assert sorted(p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                  for p in peers["from"]) == ["frontend", "planner", "worker"]  # fmt: skip
    assert all(
        p["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "llama3-70b"
        for p in peers["from"]
    )
    assert metrics["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_deployment_has_a_disruption_budget_and_drains(
    rendered_envs: dict[str, Rendered], env: str
) -> None:
    rendered = rendered_envs[env]
    budgets = [
        b["spec"]["selector"]["matchLabels"] for b in rendered.of_kind("PodDisruptionBudget")
    ]
    for deployment in rendered.of_kind("Deployment"):
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "planner":
            continue  # one replica, Recreate, no /health (test_chart_wiring.py)
        assert deployment["spec"]["selector"]["matchLabels"] in budgets
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        serve = c["args"][0] == "serve"  # the frontend: ready when it can route, alive regardless
        assert c["readinessProbe"]["httpGet"]["path"] == ("/ready" if serve else "/health")
        assert c["livenessProbe"]["httpGet"]["path"] == ("/live" if serve else "/health")
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        if "worker" in c["args"][:1]:
            drain = next(int(a.split("=")[1]) for a in c["args"] if a.startswith("--drain-timeout"))
            assert pod["terminationGracePeriodSeconds"] > drain
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model-cache"]["readOnly"] is True


def test_monitoring_objects_carry_the_generated_dashboards_and_rules(
    rendered_envs: dict[str, Rendered],
) -> None:
    rendered = rendered_envs["g6-aggregated"]
    dashboards = {
        name: text
        for cm in rendered.of_kind("ConfigMap")
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1"
        for name, text in cm["data"].items()
    }
    committed = {p.name: p.read_text() for p in (REPO_ROOT / "grafana/dashboards").glob("*.json")}
    assert dashboards.keys() == committed.keys()
    for name, text in dashboards.items():
        assert json.loads(text) == json.loads(committed[name]), name
    (rule,) = rendered.of_kind("PrometheusRule")
    rule_file = REPO_ROOT / "platform/monitoring/rules/strata-rules.yaml"
    assert rule["spec"]["groups"] == yaml.safe_load(rule_file.read_text())["groups"]
    for kind in ("PrometheusRule", "ServiceMonitor", "PodMonitor"):
        (obj,) = rendered.of_kind(kind)
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (pod_monitor,) = rendered.of_kind("PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_off_features_render_nothing(rendered_envs: dict[str, Rendered]) -> None:
    rendered = rendered_envs["g6-aggregated"]  # planner, discovery and KV tiers off
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"]
                  for d in rendered.of_kind("Deployment")}  # fmt: skip
    assert components == {"frontend", "worker"}
    labels = [o["metadata"]["labels"] for o in rendered.objects if o["kind"].startswith("Role")]
    assert {la["app.kubernetes.io/name"] for la in labels} == {"strata-workflows"}
    for deployment in rendered.of_kind("Deployment"):
        args = container(deployment)["args"]
        assert not any(a.startswith(("--kv-host", "--kv-disk", "--kv-s3", "--discovery"))
                       for a in args)  # fmt: skip
        if args[0] == "serve":
            assert [a for a in args if a.startswith("--worker-url=")]
            assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    rendered = render_with(
        "g6-aggregated", strata={"monitoring": {"dashboards": False}}, karpenter=None,
        storage=None, workflows=None,
    )  # fmt: skip
    assert not any(
        cm["metadata"]["labels"].get("grafana_dashboard") for cm in rendered.of_kind("ConfigMap")
    )


def test_storage_backends_bind_the_claim_the_workers_mount(
    rendered_envs: dict[str, Rendered],
) -> None:
    fsx = rendered_envs["p5-disagg-efa"]
    (claim,) = fsx.of_kind("PersistentVolumeClaim")
    (volume,) = fsx.of_kind("PersistentVolume")
    assert claim["metadata"]["name"] == "fsx-models"
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert volume["spec"]["claimRef"] == {"namespace": "strata", "name": "fsx-models"}
    assert volume["spec"]["csi"]["volumeHandle"] == "fs-0fedcba9876543210"
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    for deployment in fsx.of_kind("Deployment"):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "fsx-models"
    efs = rendered_envs["p6-b200"]
    (storage_class,) = efs.of_kind("StorageClass")
    assert storage_class["provisioner"] == "efs.csi.aws.com"
    assert storage_class["parameters"]["provisioningMode"] == "efs-ap"
    (claim,) = efs.of_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "strata-efs"


def test_platform_dir_holds_no_python() -> None:
    assert list(PLATFORM_DIR.rglob("*.py")) == []
