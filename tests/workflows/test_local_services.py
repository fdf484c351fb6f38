"""``strata local``: real moto, MLflow and (where installed) Prometheus processes on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from tests.workflows.conftest import free_port, start_moto, stop_moto
from workflows import local_services
from workflows.local_cli import app
from workflows.local_s3_snapshot import restore_s3, snapshot_s3
from workflows.local_services import (
    MLFLOW_BUCKET,
    LocalServicesError,
    local_services_status,
    start_local_services,
    stop_local_services,
)
from workflows.steps.s3 import make_s3_client

HAS_PROMETHEUS = shutil.which("prometheus") is not None


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A services root that is always torn down, whatever the test left running."""
    yield tmp_path / "local"
    stop_local_services(tmp_path / "local", snapshot=False)


def test_status_of_a_fresh_root_shows_everything_stopped(root: Path) -> None:
    services = local_services_status(root)
    states = {h.name: h.state for h in services.handles}
    prometheus_state = "stopped" if HAS_PROMETHEUS else "unavailable"
    # Grafana: "stopped" where a binary or a container runtime exists, else "unavailable".
    assert states.pop("grafana") in {"stopped", "unavailable"}
    assert states == {"s3": "stopped", "mlflow": "stopped", "prometheus": prometheus_state}
    assert services.s3_url == "http://127.0.0.1:9000"
    assert all(h.pid is None for h in services.handles)

    result = CliRunner().invoke(app, ["status", "--root", str(root)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert rows["s3"][:4] == ["s3", "http://127.0.0.1:9000", "-", "stopped"]
    as_json = CliRunner().invoke(app, ["status", "--root", str(root), "--output", "json"])
    records = {r["service"]: r for r in json.loads(as_json.output)}
    assert records["mlflow"]["state"] == "stopped" and records["mlflow"]["pid"] is None


def test_taken_port_fails_clearly_and_stops_what_it_started(root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mlflow_port = taken.getsockname()[1]
        with pytest.raises(LocalServicesError, match=rf"mlflow: port {mlflow_port} .* taken"):
            start_local_services(
                root, s3_port=free_port(), mlflow_port=mlflow_port, prometheus_port=free_port()
            )
    s3_pid = _record(root, "s3")["pid"]
    assert is_gone(s3_pid)
    assert {h.state for h in local_services_status(root).handles} <= {"stopped", "unavailable"}


def test_snapshot_and_restore_keep_objects_across_servers(tmp_path: Path) -> None:
    snapshot_dir = tmp_path / "s3"
    proc, url = start_moto(tmp_path / "moto1.log")
    try:
        client = make_s3_client(url)
        client.create_bucket(Bucket="strata-models")
        client.create_bucket(Bucket="empty-bucket")
        objects = {"m/a.bin": b"a" * 100_000, "m": b"a key that is also a prefix", "m/b/c": b""}
        for key, body in objects.items():
            client.put_object(Bucket="strata-models", Key=key, Body=body, ContentType="x/y")
        assert snapshot_s3(url, snapshot_dir) == sum(map(len, objects.values()))
        assert snapshot_s3(url, snapshot_dir) == 0  # unchanged objects are not fetched again
        client.delete_object(Bucket="strata-models", Key="m")
        assert snapshot_s3(url, snapshot_dir) == 0
        del objects["m"]
        assert len(list((snapshot_dir / "blobs").glob("*/*"))) == 2  # m's bytes are dropped
    finally:
        stop_moto(proc)

    proc, url = start_moto(tmp_path / "moto2.log")
    try:
        assert restore_s3(url, snapshot_dir) == 2
        client = make_s3_client(url)
        buckets = {b["Name"] for b in client.list_buckets()["Buckets"]}
        assert buckets == {"strata-models", "empty-bucket"}
        for key, body in objects.items():
            response = client.get_object(Bucket="strata-models", Key=key)
            assert (response["Body"].read(), response["ContentType"]) == (body, "x/y")
        assert snapshot_s3(url, snapshot_dir) == 0  # restore recorded the new ETags
    finally:
        stop_moto(proc)


def test_down_kills_a_process_group_that_ignores_sigterm(root: Path) -> None:
    """SIGTERM first; SIGKILL for the whole group once the timeout passes."""
    ignore_term = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignore_term], stdout=subprocess.PIPE, start_new_session=True
    )
    child_pid = int(proc.stdout.readline())  # type: ignore[union-attr]
    (root / "run").mkdir(parents=True)
    local_services._write_record(root, local_services._Spec("mlflow", free_port(), []), proc.pid)
    assert local_services_status(root)["mlflow"].pid == proc.pid

    started_s = time.monotonic()
    stop_local_services(root, timeout_s=0.5)

    assert time.monotonic() - started_s >= 0.5  # SIGTERM was given its chance
    assert is_gone(proc.pid) and is_gone(child_pid)
    assert local_services_status(root)["mlflow"].state == "stopped"


def _mlflow_experiment_names(mlflow_url: str) -> list[str]:
    response = httpx.post(
        f"{mlflow_url}/api/2.0/mlflow/experiments/search", json={"max_results": 100}, timeout=10
    )
    response.raise_for_status()
    return sorted(e["name"] for e in response.json()["experiments"])


@pytest.mark.slow
def test_up_status_down_and_data_survives_a_restart(root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    ports = {"s3_port": free_port(), "mlflow_port": free_port(), "prometheus_port": free_port()}
    services = start_local_services(root, **ports)

    states = {h.name: h.state for h in services.handles}
    # Grafana starts only with a grafana_port: "stopped" where it could run, else "unavailable".
    assert states.pop("grafana") in {"stopped", "unavailable"}
    assert states == {
        "s3": "running",
        "mlflow": "running",
        "prometheus": "running" if HAS_PROMETHEUS else "unavailable",
    }
    assert services.mlflow_url == f"http://127.0.0.1:{ports['mlflow_port']}"
    assert _mlflow_experiment_names(services.mlflow_url) == ["Default"]
    if HAS_PROMETHEUS:
        assert httpx.get(f"{services.prometheus_url}/-/ready", timeout=5).status_code == 200

    # MLflow stores artifacts in the local S3; a user bucket lives beside them.
    client = MlflowClient(services.mlflow_url)
    run = client.create_run(client.create_experiment("lifecycle"))
    (tmp_path / "note.txt").write_text("survives restarts")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    s3 = make_s3_client(services.s3_url)
    artifact_keys = [o["Key"] for o in s3.list_objects_v2(Bucket=MLFLOW_BUCKET)["Contents"]]
    assert artifact_keys == [f"1/{run.info.run_id}/artifacts/note.txt"]
    s3.create_bucket(Bucket="strata-models")
    s3.put_object(Bucket="strata-models", Key="m/config.json", Body=b"{}")

    again = start_local_services(root, **ports)  # already up: nothing restarts
    assert [h.pid for h in again.handles] == [h.pid for h in services.handles]
    shown = CliRunner().invoke(app, ["status", "--root", str(root)])
    assert shown.exit_code == 0 and services.mlflow_url in shown.output

    down = CliRunner().invoke(app, ["down", "--root", str(root)])
    assert down.exit_code == 0, down.output
    assert all(is_gone(h.pid) for h in services.handles if h.pid is not None)
    assert local_services_status(root)["s3"].state == "stopped"

    restarted = start_local_services(root, **ports)
    assert _mlflow_experiment_names(restarted.mlflow_url) == ["Default", "lifecycle"]
    s3 = make_s3_client(restarted.s3_url)
    assert s3.get_object(Bucket="strata-models", Key="m/config.json")["Body"].read() == b"{}"
    note = MlflowClient(restarted.mlflow_url).download_artifacts(
        run.info.run_id, "note.txt", str(tmp_path)
    )
    assert Path(note).read_text() == "survives restarts"


def _record(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / "run" / f"{name}.json").read_text())
