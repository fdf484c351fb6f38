"""``strata worker --enforce-eager --kernels ...`` reach ``EngineConfig`` (typer, parsed once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

import serving.worker.server
from serving.worker.cli import worker
from serving.worker.config import WorkerConfig


def invoke(args: list[str], monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[Result, list]:
    seen: list[WorkerConfig] = []
    monkeypatch.setattr(serving.worker.server, "run_worker", seen.append)
    app = typer.Typer()
    app.command()(worker)
    result = CliRunner().invoke(app, args, env=env or None)
    return result, seen


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_defaults_are_graphs_on_and_auto_kernels(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, seen = invoke([f"--model={model_dir}"], monkeypatch)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.engine.enforce_eager is False
    assert config.engine.kernels == "auto"


@pytest.mark.parametrize("kernels", ["auto", "torch", "triton"])
def test_flags_reach_the_engine_config(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, kernels: str
) -> None:
    args = [f"--model={model_dir}", "--enforce-eager", "--kernels", kernels]
    result, seen = invoke(args, monkeypatch)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.engine.enforce_eager is True
    assert config.engine.kernels == kernels


def test_environment_variables_set_the_flags(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, seen = invoke(
        [f"--model={model_dir}"], monkeypatch, STRATA_ENFORCE_EAGER="1", STRATA_KERNELS="torch"
    )
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (config.engine.enforce_eager, config.engine.kernels) == (True, "torch")


def test_an_unknown_kernel_choice_is_refused_naming_the_flag(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, seen = invoke([f"--model={model_dir}", "--kernels", "flashinfer"], monkeypatch)
    assert result.exit_code == 2
    assert seen == []
    assert "kernels" in result.output
    assert "'auto', 'torch' or 'triton'" in result.output
