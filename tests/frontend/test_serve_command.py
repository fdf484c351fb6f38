"""``strata serve``'s local worker command lines, parsed by the real ``strata worker`` CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import serving.worker.server
from serving.frontend.serve import ServeConfig, worker_command
from serving.worker.cli import worker
from serving.worker.config import WorkerConfig


def parsed(cmd: list[str], monkeypatch: pytest.MonkeyPatch) -> WorkerConfig:
    """Run the worker CLI on ``cmd``'s arguments with ``run_worker`` captured."""
    seen: list[WorkerConfig] = []
    monkeypatch.setattr(serving.worker.server, "run_worker", seen.append)
    app = typer.Typer()
    app.command()(worker)
    assert cmd[1:3] == ["-m", "serving.worker"]
    result = CliRunner().invoke(app, cmd[3:])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_roles_and_devices_reach_the_workers(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServeConfig(
        model_dir=smollm2_dir, num_workers=1, num_prefill=1, num_decode=2,
        worker_devices=["cuda:0", "cuda:1"], kv_transport="tcp",
        worker_args=["--num-blocks=64"],
    )  # fmt: skip
    assert config.roles == ["both", "prefill", "decode", "decode"]
    workers = [
        parsed(worker_command(config, i, role, 9000 + i, 9100 + 2 * i), monkeypatch)
        for i, role in enumerate(config.roles)
    ]
    assert [w.role for w in workers] == config.roles
    assert [w.engine.device for w in workers] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [w.resolved_kv_transport for w in workers] == ["none", "tcp", "tcp", "tcp"]
    assert {w.engine.num_blocks for w in workers} == {64}
    assert [w.port for w in workers] == [9000, 9001, 9002, 9003]


def test_without_devices_workers_keep_the_default(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServeConfig(model_dir=smollm2_dir, num_workers=0, num_prefill=1, num_decode=1)
    prefill = parsed(worker_command(config, 0, "prefill", 9000, 9100), monkeypatch)
    assert prefill.engine.device == "cpu"
    assert prefill.resolved_kv_transport == "auto"


def test_serve_flags_for_many_models_discovery_keys_and_limits(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flags the Helm chart sets reach ``ServeConfig``; bad combinations name the flag."""
    import serving.frontend.serve
    from serving.frontend.cli import serve

    seen: list[ServeConfig] = []
    monkeypatch.setattr(serving.frontend.serve, "run_serve", seen.append)
    app = typer.Typer()
    app.command()(serve)
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: []\n")
    args = ["--model", str(smollm2_dir), "--served-model-name", "smol",
            "--model", f"{smollm2_dir};name=mock;engine=mock;workers=2",
            "--discovery", "kubernetes", "--kube-namespace", "strata",
            "--admin-key", "sk-admin", "--keys-file", str(keys),
            "--max-inflight-requests", "8", "--max-queued-prompt-tokens", "4096"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert [(e.name, e.engine, e.num_workers) for e in config.entries] == [
        ("smol", "builtin", 1), ("mock", "mock", 2)
    ]  # fmt: skip
    assert (config.discovery, config.kube_namespace, config.admin_key) == (
        "kubernetes", "strata", "sk-admin"
    )  # fmt: skip
    assert (config.keys_file, config.max_inflight_requests) == (keys, 8)
    assert config.kube_selector == "app.kubernetes.io/component=worker"
    for bad, message in (
        (["--discovery", "file"], "--discovery-file"),
        (["--model", f"{smollm2_dir};engine=nope"], "engine must be one of"),
        (["--model", f"{smollm2_dir};name=smol"], "must differ"),
    ):
        result = CliRunner().invoke(app, [*args[:4], *bad])
        said = " ".join(result.output.replace("│", " ").split())  # rich wraps the box
        assert result.exit_code != 0 and message in said, said
