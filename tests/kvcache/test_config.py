"""KV tier settings: worker flags, what strata serve passes its workers, router tier weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.frontend.serve import ServeConfig, worker_command
from serving.kvcache.config import KVTierConfig, parse_tier_weights


def test_disk_tier_needs_its_directory_and_s3_a_uri() -> None:
    with pytest.raises(ValueError, match="--kv-disk-dir"):
        KVTierConfig(disk_gib=1)
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        KVTierConfig(s3_uri="bucket/x")
    assert not KVTierConfig().enabled
    assert KVTierConfig(host_gib=0.5).enabled


def test_serve_gives_each_worker_its_disk_dir_and_each_model_its_s3_prefix(tmp_path: Path) -> None:
    cfg = ServeConfig(
        model_dir=tmp_path, served_model_name="m", kv_host_gib=2, kv_disk_gib=8,
        kv_disk_dir=tmp_path / "kv", kv_s3_uri="s3://b/kv/",
    )  # fmt: skip
    args = [worker_command(cfg, i, "both", 9000 + i, 9100 + i) for i in (0, 1)]
    for i, cmd in enumerate(args):
        flags = dict(itertools.pairwise(cmd))
        assert flags["--kv-host-gib"] == "2" and flags["--kv-disk-gib"] == "8"
        assert flags["--kv-disk-dir"] == str(tmp_path / "kv" / f"m-{i}")
        assert flags["--kv-s3-uri"] == "s3://b/kv/m"
    plain = worker_command(ServeConfig(model_dir=tmp_path), 0, "both", 1, 2)
    assert not [a for a in plain if a.startswith("--kv-") and a != "--kv-events-port"]


def test_tier_weights_parse_and_name_a_bad_entry() -> None:
    assert parse_tier_weights(["cpu=0.9", "DISK=0.5"]) == {"CPU": 0.9, "DISK": 0.5}
    with pytest.raises(ValueError, match="'S3'"):
        parse_tier_weights(["S3"])


def test_worker_cli_names_the_bad_tier_flag() -> None:
    import typer

    from serving.worker.cli import worker

    app = typer.Typer()
    app.command()(worker)
    args = ["--engine", "mock", "--vocab-size", "10", "--kv-disk-gib", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--kv-disk-dir" in result.output
