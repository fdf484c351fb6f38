"""The command lines in the rendered Deployments parse with the real ``strata worker`` and
``strata serve`` CLIs (typer), and say what the values meant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import serving.frontend.serve
import serving.worker.server
from serving.frontend.cli import serve
from serving.frontend.serve import ServeConfig
from serving.worker.cli import worker
from serving.worker.config import WorkerConfig
from tests.platform.conftest import ENVIRONMENTS, Rendered


def invoke(command: Any, args: list[str]) -> None:
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)


def make_model_dir(root: Path) -> Path:
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    return model_dir


def pod_args(deployment: dict[str, Any]) -> list[str]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["strata"]
    return c["args"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_worker_command_lines_parse_with_the_worker_cli(
    rendered_envs: dict[str, Rendered],
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    rendered = rendered_envs[env]
    model_arg = f"--model={rendered.env.strata['model']['path']}"
    model_dir = make_model_dir(tmp_path)  # the CLI checks the directory exists
    seen: list[WorkerConfig] = []
    monkeypatch.setattr(serving.worker.server, "run_worker", seen.append)
    pools = {p["name"]: p for p in rendered.env.strata["workers"]["pools"]}
    worker_deployments = [
        d for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]  # fmt: skip
    assert len(worker_deployments) == len(pools)
    for deployment in worker_deployments:
        args = pod_args(deployment)
        assert args[0] == "worker"
        assert model_arg in args
        invoke(worker, [f"--model={model_dir}" if a == model_arg else a for a in args[1:]])
        config = seen.pop()
        labels = deployment["metadata"]["labels"]
        pool = pools[labels["strata.dev/worker-pool"]]
        assert config.role == pool["role"] == labels["strata.dev/role"]
        assert config.model_names == [rendered.env.strata["model"]["name"]]
        assert config.engine.model_dir == model_dir
        assert config.engine.device == "cuda"
        assert (config.host, config.port, config.kv_events_port) == ("0.0.0.0", 8000, 5557)
        if pool["role"] == "both":
            assert config.resolved_kv_transport == "none"
        else:
            assert config.kv_transfer_host == "$(POD_IP)"  # expanded by the kubelet
            assert config.kv_transfer_port == 5600
        requests = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert (config.efa != "off") == ("vpc.amazonaws.com/efa" in requests)
        ports = {p["name"]: p["containerPort"] for p in
                 deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
        assert ports["http"] == config.port
        assert ports["kv-events"] == config.kv_events_port
        tiers = rendered.env.strata.get("kvTiers", {})
        assert config.kv_tiers.enabled == bool(tiers.get("enabled"))
        if tiers.get("enabled"):
            assert config.kv_tiers.host_gib == tiers.get("hostGiB", 0)
            assert config.kv_tiers.disk_gib == tiers.get("diskGiB", 0)
            model = rendered.env.strata["model"]["name"]
            s3_uri = tiers.get("s3Uri")
            assert config.kv_tiers.s3_uri == (f"{s3_uri}/{model}" if s3_uri else None)
            assert config.kv_tiers.cost_check is True


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_frontend_command_line_parses_and_reaches_every_worker_service(
    rendered_envs: dict[str, Rendered],
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    rendered = rendered_envs[env]
    seen: list[ServeConfig] = []
    monkeypatch.setattr(serving.frontend.serve, "run_serve", seen.append)
    model_dir = make_model_dir(tmp_path)  # serve checks the directory holds a model
    (frontend,) = [
        d for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "frontend"
    ]  # fmt: skip
    args = pod_args(frontend)
    assert args[0] == "serve"
    model_arg = f"--model={rendered.env.strata['model']['path']}"
    assert model_arg in args
    invoke(serve, [f"--model={model_dir}" if a == model_arg else a for a in args[1:]])
    (config,) = seen
    assert config.num_workers == config.num_prefill == config.num_decode == 0
    assert config.served_model_name == rendered.env.strata["model"]["name"]
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    urls = sorted(config.worker_urls)
    if rendered.env.strata.get("discovery", {}).get("enabled"):
        # The pods come from EndpointSlices (test_chart_wiring.py), not from pool Services.
        assert urls == [] and config.discovery == "kubernetes"
        assert config.kube_namespace == rendered.env.namespace
        assert config.kube_selector == (
            f"app.kubernetes.io/component=worker,app.kubernetes.io/instance={rendered.env.release}"
        )
        urls = []
    else:
        assert config.discovery == "static"
        assert len(urls) == len(rendered.env.strata["workers"]["pools"])
    for url in urls:
        address, *options = url.split(";")
        host, port = address.removeprefix("http://").split(":")
        options = dict(o.split("=") for o in options)
        selector = services[host]["spec"]["selector"]
        assert selector["strata.dev/role"] == options["role"]
        assert selector["app.kubernetes.io/component"] == "worker"
        assert int(port) == services[host]["spec"]["ports"][0]["port"]
    api_key = rendered.env.strata.get("frontend", {}).get("apiKeySecret")
    env_vars = {e["name"]: e for e in frontend["spec"]["template"]["spec"]["containers"][0]["env"]}
    if api_key:
        assert env_vars["STRATA_API_KEY"]["valueFrom"]["secretKeyRef"] == api_key
    else:
        assert "STRATA_API_KEY" not in env_vars
    admin_key = rendered.env.strata.get("frontend", {}).get("adminKeySecret")
    if admin_key:
        assert env_vars["STRATA_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == admin_key
    else:
        assert "STRATA_ADMIN_KEY" not in env_vars
