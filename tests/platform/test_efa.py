"""EFA at worker start: required and missing -> exit non-zero with a one-line reason; fallback
allowed -> the worker serves and reports efa="fallback" in strata_worker_info."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from serving.worker.cli import worker
from serving.worker.efa import EFAUnavailable, check_efa, find_efa_devices
from tests.worker.conftest import REPO_ROOT, labelled, scrape, start_worker_process


def fake_sysfs(root: Path, devices: dict[str, str]) -> Path:
    """``/sys/class/infiniband`` with each device's ``device/driver`` link to ``drivers/<d>``."""
    sysfs = root / "class" / "infiniband"
    sysfs.mkdir(parents=True)
    for name, driver in devices.items():
        (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        (sysfs / name / "device").mkdir(parents=True)
        os.symlink(root / "drivers" / driver, sysfs / name / "device" / "driver")
    return sysfs


def test_only_devices_bound_to_the_efa_driver_count(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {"rdmap16s27": "efa", "rdmap0s6": "efa", "mlx5_0": "mlx5_core"})
    (sysfs / "stray").mkdir()  # no device/driver link
    assert find_efa_devices(sysfs) == ("rdmap0s6", "rdmap16s27")
    assert find_efa_devices(tmp_path / "missing") == ()
    assert check_efa("required", sysfs).state == "ok"
    assert check_efa("fallback", sysfs).devices == ("rdmap0s6", "rdmap16s27")


def test_modes_without_efa(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {"mlx5_0": "mlx5_core"})
    assert check_efa("off", sysfs).state == "off"
    assert check_efa("fallback", sysfs).state == "fallback"
    with pytest.raises(EFAUnavailable, match="EFA required"):
        check_efa("required", sysfs)


MOCK_WORKER = ["--engine", "mock", "--vocab-size", "1000", "--num-blocks", "64"]


@pytest.mark.slow
def test_required_efa_missing_exits_with_a_one_line_reason(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {"mlx5_0": "mlx5_core"})
    cmd = [sys.executable, "-m", "serving.worker", *MOCK_WORKER, "--port", "0", "--efa",
           "required", "--efa-sysfs-dir", str(sysfs), "--log-level", "error"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: EFA required (--efa required) but no RDMA device")
    assert str(sysfs) in lines[0]
    assert "vpc.amazonaws.com/efa" in lines[0]
    assert done.stdout == ""  # refused before serving anything


def test_bad_efa_mode_names_the_flag() -> None:
    # In-process: the real CLI refuses the value while parsing, before any worker starts.
    app = typer.Typer()
    app.command()(worker)
    done = CliRunner().invoke(app, [*MOCK_WORKER, "--efa", "maybe"])
    assert done.exit_code == 2
    assert "efa" in done.output and "'required'" in done.output


@pytest.mark.slow
def test_fallback_serves_and_reports_it_in_metrics(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, {})
    log = tmp_path / "worker.log"
    worker = start_worker_process(
        [*MOCK_WORKER, "--efa", "fallback", "--efa-sysfs-dir", str(sysfs)], log
    )
    try:
        assert worker.health["efa"] == "fallback"
        reply = httpx.post(
            f"{worker.base_url}/completions",
            json={"model": "mock", "prompt": [1, 2, 3], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        values = scrape(worker.url)
        assert labelled(values, "strata_worker_info", efa="fallback") == 1
        assert labelled(values, "strata_worker_info", efa="ok") == 0
    finally:
        worker.stop()
    assert "EFA fallback: no RDMA device with driver 'efa'" in log.read_text()
