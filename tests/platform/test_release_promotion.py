"""Promotion into the serving chart's release: the pure patches (only --model= and the version
label change; another model's release is refused), and the lifecycle's promote and rollback
steps moving the release (not the frontend's workers) when ``release`` is set, with the
registry's aliases restored when the move fails. The calls against an API server, and the
RBAC they need, are in test_workflows_chart.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.platform.conftest import Rendered
from workflows.pipeline import PublishParams
from workflows.steps import deploy, registry
from workflows.steps.deploy import DeployError
from workflows.steps.k8s_manifests import release_patches
from workflows.steps.lifecycle import promote_step, rollback_step

MODEL = "llama-3-70b-instruct"


def test_release_patches_move_only_the_model_path_and_version(
    rendered_envs: dict[str, Rendered],
) -> None:
    deployments = rendered_envs["p5-disagg-efa"].of_kind("Deployment")
    patches = release_patches(deployments, MODEL, f"/model-cache/{MODEL}-v4", "4")
    components = {d["metadata"]["name"]: d["metadata"]["labels"]["app.kubernetes.io/component"]
                  for d in deployments}  # fmt: skip
    assert sorted(components[n] for n in patches) == ["frontend", "worker", "worker"]
    for deployment in deployments:
        patch = patches.get(deployment["metadata"]["name"])
        if patch is None:
            continue
        (before,) = deployment["spec"]["template"]["spec"]["containers"]
        (after,) = patch["spec"]["template"]["spec"]["containers"]
        changed = [(a, b) for a, b in zip(before["args"], after["args"], strict=True) if a != b]
        assert changed == [(f"--model=/model-cache/{MODEL}", f"--model=/model-cache/{MODEL}-v4")]
        assert patch["metadata"] == {"labels": {"strata.dev/model-version": "4"}}
        assert set(patch["spec"]) == {"template"}  # replicas stay the planner's
    with pytest.raises(DeployError, match="serves model 'llama-3-70b-instruct', not 'other'"):
        release_patches(deployments, "other", "/model-cache/other", "1")


@pytest.fixture
def lifecycle(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """The registry and the cluster replaced by recorders; ``fail`` makes the move raise."""
    calls: dict[str, list[Any]] = {"promote_release": [], "switch": [], "restored": [], "fail": []}
    aliases = {"production": "3"}

    def promote_release(params: PublishParams, version: str, staged: Path, **kw: Any) -> list:
        if calls["fail"]:
            raise DeployError("rollout stalled")
        calls["promote_release"].append((params.release, version, str(staged), kw))
        return ["x"]

    def info(uri: str, name: str, version: str) -> registry.VersionInfo:
        return registry.VersionInfo(version, f"/model-cache/{name}-v{version}", "", "", "", [])

    monkeypatch.setattr(deploy, "promote_release", promote_release)
    monkeypatch.setattr(deploy, "switch_production", lambda *a, **k: calls["switch"].append(a))
    monkeypatch.setattr(registry, "get_version", info)
    monkeypatch.setattr(registry, "get_aliases", lambda uri, name: dict(aliases))
    monkeypatch.setattr(registry, "promote", lambda uri, name, v: registry.AliasMove(v, "3"))
    monkeypatch.setattr(registry, "rollback", lambda uri, name: registry.AliasMove("3", None))
    monkeypatch.setattr(registry, "restore_aliases",
                        lambda uri, name, before: calls["restored"].append(before))  # fmt: skip
    return calls


def test_promote_and_rollback_move_the_release(lifecycle: dict[str, list[Any]]) -> None:
    params = PublishParams(name=MODEL, deploy_target="kubernetes", release="llama3-70b",
                           frontend_url="http://frontend")  # fmt: skip
    candidate = "http://strata-worker-m-v4.strata.svc.cluster.local:8000"
    assert promote_step(params, "4", True, True, candidate) == {"production": "4", "previous": "3"}
    assert rollback_step(params) == {"production": "3", "previous": None}
    assert lifecycle["promote_release"] == [
        ("llama3-70b", "4", f"/model-cache/{MODEL}-v4", {"candidate_endpoint": candidate}),
        ("llama3-70b", "3", f"/model-cache/{MODEL}-v3", {}),
    ]
    assert lifecycle["switch"] == []  # the release, not the frontend's worker list
    lifecycle["fail"].append(True)
    with pytest.raises(DeployError, match="rollout stalled"):
        promote_step(params, "5", True, True, candidate)
    assert lifecycle["restored"] == [{"production": "3"}]
    # Without a release the frontend's workers are switched, as before.
    lifecycle["fail"].clear()
    promote_step(PublishParams(name=MODEL, frontend_url="http://frontend"), "6", True, True,
                 candidate)  # fmt: skip
    assert lifecycle["switch"] == [("http://frontend", candidate, MODEL)]
