"""``strata bench replay --planner``: the day study end to end on a tiny trace and small workers
(the real core over the virtual connector, in virtual time; seconds of wall time)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from bench.replay_fluid import SimRequest
from bench.replay_planner import WindowStats
from workflows.bench_cli import app as bench_app


def _trace(path: Path) -> Path:
    """Ten minutes of trace time: one 400-token prompt with 40 output tokens every second."""
    rows = [
        {"timestamp": i * 1000, "input_length": 400, "output_length": 40, "hash_ids": [i]}
        for i in range(600)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_replay_planner_compares_static_and_the_planner(tmp_path: Path) -> None:
    config = tmp_path / "planner.yaml"
    config.write_text(yaml.safe_dump({
        "model": "x", "profile": "unused.json", "roles": {"both": {}},
        "predictor": {"kind": "moving_average"}, "scaling": {"interval_s": 30},
    }))  # fmt: skip
    out = tmp_path / "study.json"
    result = CliRunner().invoke(bench_app, [
        "replay", "--trace", str(_trace(tmp_path / "trace.jsonl")),
        "--planner", "static,lead-time", "--planner-config", str(config),
        "--speedup", "8", "--duration-s", "3600", "--lead-time-s", "60",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "512",
        "--kv-blocks-per-worker", "64", "--block-size", "64", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    by = {r["policy"]: r for r in report["results"]}
    assert set(by) == {"static", "lead-time"}
    static, planned = by["static"], by["lead-time"]
    assert static["requests"] == planned["requests"] > 0  # the same requests
    assert static["rejected"] == planned["rejected"] == 0
    assert static["replicas"]["min"] == static["replicas"]["max"] == report["static_replicas"]
    assert planned["replicas"]["min"] >= 1 and planned["gpu_hours"] > 0
    assert report["config"]["lead_time_s"] == 60
    assert "gpu_hours_saved_vs_static" in report["verdict"]


def test_replay_planner_names_an_unknown_policy(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_app, [
        "replay", "--trace", str(_trace(tmp_path / "trace.jsonl")), "--planner", "psychic",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "policies" in result.output


def test_window_counts_arrivals_not_only_finished_requests() -> None:
    """A pool too short to finish anything still shows the planner its demand."""
    window = WindowStats(window_s=10.0)
    for i in range(20):
        window.arrive(SimRequest(i, arrival_s=i * 0.5, input_tokens=100, output_tokens=10))
    traffic = window.traffic(now_s=10.0)
    assert traffic.request_rate == 2.0 and traffic.num_requests == 0.0
