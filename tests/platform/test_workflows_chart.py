"""The strata-workflows chart: its WorkflowTemplates are Hera's, wired to the environment's
image, model-cache PVC, ServiceAccount and MLflow URL; the steps' Role grants exactly the API
calls the deploy step makes (recorded by the fake API server the deploy tests use)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.platform.conftest import ENVIRONMENTS, Rendered
from tests.workflows.fake_kube_api import PATH, FakeKubeAPI, Recorded, _status, write_kubeconfig
from workflows.argo import build_templates
from workflows.pipeline import PublishParams
from workflows.platform_cli import workflow_template_files
from workflows.steps.deploy import deploy_candidate, remove_run_deployments, switch_production
from workflows.steps.k8s_deploy import STRATEGIC_MERGE_PATCH

# What Argo's executor itself needs in the step pods (outputs as WorkflowTaskResults, v3.4+).
EXECUTOR_RULES = {("argoproj.io", "workflowtaskresults", "create"),
                  ("argoproj.io", "workflowtaskresults", "patch")}  # fmt: skip


def parameters(template: dict[str, Any]) -> dict[str, str | None]:
    return {p["name"]: p.get("value") for p in template["spec"]["arguments"]["parameters"]}


def test_chart_templates_are_what_hera_renders() -> None:
    stale = [p for p, text in workflow_template_files().items() if p.read_text() != text]
    assert stale == [], "run `strata platform generate`"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_templates_reference_the_environments_image_pvc_account_and_mlflow(
    rendered_envs: dict[str, Rendered], env: str
) -> None:
    rendered = rendered_envs[env]
    templates = {t["metadata"]["name"]: t for t in rendered.of_kind("WorkflowTemplate")}
    assert set(templates) == {"publish-model", "rollback-model"}
    (frontend,) = [d for d in rendered.of_kind("Deployment") if "frontend" in d["metadata"]["name"]]
    image = frontend["spec"]["template"]["spec"]["containers"][0]["image"]
    (claim,) = rendered.of_kind("PersistentVolumeClaim")
    mounted = {
        v["persistentVolumeClaim"]["claimName"]
        for d in rendered.of_kind("Deployment")
        for v in d["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "model-cache"
    }
    accounts = {  # the workflow chart's bindings (the serving chart has its own)
        subject["name"]
        for binding in rendered.of_kind("RoleBinding")
        for subject in binding["subjects"]
        if subject["name"] != "strata-publisher"
        and binding["metadata"]["labels"].get("app.kubernetes.io/name") == "strata-workflows"
    }
    mlflow = rendered.env.workflows.get(
        "mlflowTrackingUri", "http://mlflow.mlflow.svc.cluster.local:5000"
    )
    for name, template in templates.items():
        params = parameters(template)
        assert params["image"] == image
        assert {params["service-account"]} == accounts
        assert params["mlflow-tracking-uri"] == mlflow
        if name == "publish-model":
            assert {params["model-cache-pvc"]} == mounted == {claim["metadata"]["name"]}
        # Apart from those defaults and the chart's labels, the template is Hera's own.
        (hera,) = [t.to_dict() for t in build_templates(params_defaults(params)) if t.name == name]
        assert strip_labels(template) == strip_labels(hera)


def params_defaults(params: dict[str, str | None]) -> dict[str, str]:
    keys = ("image", "model-cache-pvc", "service-account", "mlflow-tracking-uri",
            "s3-endpoint-url", "frontend-url", "serving-release")  # fmt: skip
    return {k: v for k in keys if (v := params.get(k)) is not None}


def strip_labels(template: dict[str, Any]) -> dict[str, Any]:
    return {
        **template,
        "metadata": {k: v for k, v in template["metadata"].items() if k != "labels"},
    }


# --- RBAC: exactly the verbs the steps use ---------------------------------------------------


class PatchingFakeKubeAPI(FakeKubeAPI):
    """The recording fake plus strategic merge patches of Deployments and Services, as a real
    API server merges them (maps deeply, ``containers`` by name, other lists replaced)."""

    def handle(self, method: str, raw_path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        content_type = headers.get("Content-Type")
        if method != "PATCH" or content_type != STRATEGIC_MERGE_PATCH:
            return super().handle(method, raw_path, headers, raw)
        url = urlsplit(raw_path)
        body = json.loads(raw)
        with self._lock:
            self.requests.append(Recorded(method, url.path, parse_qs(url.query), content_type,
                                          body))  # fmt: skip
            match = PATH.match(url.path)
            key = (match["plural"], match["ns"], match["name"]) if match else None
            if key is None or key not in self.objects:
                return _status(404, "NotFound", f"{url.path} not found")
            obj = self.objects[key]
            merged = strategic_merge(copy.deepcopy(obj), body)
            return 200, self._store(obj["kind"], key, merged, "Update", "strata")


def strategic_merge(target: Any, patch: Any) -> Any:
    if isinstance(target, dict) and isinstance(patch, dict):
        for k, v in patch.items():
            if k == "containers":
                by_name = {c["name"]: c for c in target.get(k, [])}
                for c in v:
                    by_name[c["name"]] = strategic_merge(by_name.get(c["name"], {}), c)
                target[k] = list(by_name.values())
            else:
                target[k] = strategic_merge(target.get(k), v)
        return target
    return copy.deepcopy(patch)


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeAPI]:
    fake = PatchingFakeKubeAPI(ready_after=1)
    fake.start()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, fake.url)))
    yield fake
    fake.stop()


def recorded_rules(kube: FakeKubeAPI) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every recorded request, as the RBAC authorizer sees it."""
    rules = set()
    for request in kube.requests:
        match = PATH.match(request.path)
        assert match is not None, request.path
        group = "apps" if match["prefix"].startswith("/apis/apps") else ""
        resource = match["plural"] + ("/status" if match["status"] else "")
        if request.method == "GET":
            verb = "get" if match["name"] else "watch" if request.query.get("watch") else "list"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[
                request.method
            ]
        rules.add((group, resource, verb))
    return rules


def role_rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_step_role_grants_exactly_the_calls_the_deploy_step_makes(
    kube: FakeKubeAPI,
    tmp_path: Path,
    rendered_envs: dict[str, Rendered],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.workflows.test_deploy import FakeFrontend
    from workflows.steps import k8s_deploy

    wait_ready = k8s_deploy.wait_ready  # poll the fake server fast (the calls stay the same)
    monkeypatch.setattr(
        k8s_deploy, "wait_ready", lambda *a, **k: wait_ready(*a, **{**k, "poll_s": 0.05})
    )

    cache = tmp_path / "cache"
    params = PublishParams(name="m", cache_dir=str(cache), deploy_target="kubernetes",
                           engine="mock", run_id="run-1")  # fmt: skip
    old = deploy_candidate(params, "1", cache / "a", root=tmp_path)
    new = deploy_candidate(params, "2", cache / "b", root=tmp_path)
    deploy_candidate(params, "2", cache / "b", root=tmp_path)  # a retried step re-applies
    frontend = FakeFrontend([old.endpoint])
    try:
        switch_production(frontend.url, new.endpoint, "m", root=tmp_path)
    finally:
        frontend.stop()
    # The exit handler removes what an unpromoted run deployed.
    assert remove_run_deployments(params, root=tmp_path) == [new.name]
    # A promotion into the serving chart's release (servingRelease): its Deployments and
    # Services as rendered, moved to version 4.
    rendered = rendered_envs["p5-disagg-efa"]
    release = rendered.env.workflows["servingRelease"]
    chart = [o for o in rendered.objects if o["kind"] in ("Deployment", "Service")
             and o["metadata"]["labels"].get("app.kubernetes.io/instance") == release]  # fmt: skip
    for obj in chart:
        plural = "deployments" if obj["kind"] == "Deployment" else "services"
        key = (plural, "strata", obj["metadata"]["name"])
        kube._store(obj["kind"], key, obj, "Update", "helm")
    model = rendered.env.strata["model"]["name"]
    moved = k8s_deploy.promote_release(
        release, PublishParams(name=model, cache_dir="/model-cache", deploy_target="kubernetes"),
        "4", Path(f"/model-cache/{model}-v4"), namespace="strata",
        api_client=k8s_deploy.make_api_client(), timeout_s=30, poll_s=0.05,
    )  # fmt: skip
    assert sorted(moved) == sorted(
        o["metadata"]["name"] for o in chart if o["kind"] == "Deployment"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] in ("frontend", "worker")
    )  # fmt: skip
    for obj in chart:
        plural = "deployments" if obj["kind"] == "Deployment" else "services"
        now = kube.objects[(plural, "strata", obj["metadata"]["name"])]
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        version = now["metadata"]["labels"].get("strata.dev/model-version")
        moves = component == "worker" or (component, obj["kind"]) == ("frontend", "Deployment")
        assert version == ("4" if moves else "3"), obj["metadata"]["name"]
        if obj["kind"] == "Deployment" and component != "planner":
            (c,) = now["spec"]["template"]["spec"]["containers"]
            assert f"--model=/model-cache/{model}-v4" in c["args"]
            assert now["spec"]["template"]["metadata"]["labels"]["strata.dev/model-version"] == "4"
            assert now["spec"]["replicas"] == obj["spec"]["replicas"]  # the planner's to own
    used = recorded_rules(kube)
    assert ("apps", "deployments", "delete") in used  # the switch really removed the old one
    role = rendered.named("Role", "strata-workflows")
    assert role_rules(role) == used | EXECUTOR_RULES
    binding = rendered.named("RoleBinding", "strata-workflows")
    assert binding["roleRef"]["name"] == "strata-workflows"
    assert not rendered.of_kind("ClusterRole") and not rendered.of_kind("ClusterRoleBinding")
    for obj in rendered.of_kind("Role"):
        assert all("*" not in v for r in obj["rules"] for v in r["verbs"] + r["resources"])
