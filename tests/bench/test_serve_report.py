"""``strata bench serve``: a real load against a mock worker process, run.json, the reports."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from bench.serve import ServeBenchConfig, read_run, run_serve_bench, write_run
from bench.serve_plots import throughput_per_s, token_times_s, worker_series
from bench.serve_probe import parse_worker_series, root_url
from bench.serve_report import write_compare_report, write_report
from bench.trace import make_synthetic_trace, write_mooncake
from tests.worker.conftest import WorkerProcess, start_worker_process
from workflows.bench_cli import app as bench_app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_REQUESTS = 20
OUTPUT_TOKENS = 12
RUN_PLOTS = ("ttft.png", "itl.png", "throughput.png")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name}: no IHDR chunk"
    assert data[-8:-4] == b"IEND", f"{path.name}: truncated"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def mock_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = start_worker_process(
        ["--engine", "mock", "--vocab-size", "32000", "--num-blocks", "512", "--speedup", "20"],
        log,
    )
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def synthetic_dir(mock_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 requests, 4 at a time, through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "synthetic"
    args = ["serve", "--url", mock_worker.base_url, "--synthetic", "--concurrency", "4",
            "--num-requests", str(NUM_REQUESTS), "--prompt-tokens", "64", "--output-tokens",
            str(OUTPUT_TOKENS), "--out", str(out), "--label", "four-clients"]  # fmt: skip
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def trace_dir(mock_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 trace requests (16-token hash blocks) at 20 req/s, replayed at half speed."""
    root = tmp_path_factory.mktemp("trace")
    trace = root / "trace.jsonl"
    write_mooncake(trace, make_synthetic_trace(10, block_size=16, rate_per_s=20.0, seed=3))
    config = ServeBenchConfig(url=mock_worker.base_url, out=root / "run", trace=trace,
                              speedup=0.5, block_size=16, label="trace-half-speed")  # fmt: skip
    run_serve_bench(config)
    return root / "run"


@pytest.mark.slow
def test_synthetic_run_records_every_request_with_sane_times(synthetic_dir: Path) -> None:
    run = read_run(synthetic_dir)
    records = run["requests"]
    assert [r["index"] for r in records] == list(range(NUM_REQUESTS))
    for r in records:
        assert r["status_code"] == 200 and r["error"] is None, r
        assert r["prompt_tokens"] == 64 and r["output_tokens"] == OUTPUT_TOKENS
        assert 0 < r["ttft_s"] < 5
        assert len(r["itl_ms"]) == OUTPUT_TOKENS - 1
        assert all(0 <= gap < 1000 for gap in r["itl_ms"])
        assert r["arrival_s"] == r["sent_s"]  # closed loop: sent when a client frees up
        assert r["sent_s"] + r["ttft_s"] <= r["finished_s"] + 1e-3
        assert token_times_s(r)[-1] <= r["finished_s"] + 1e-3
    summary = run["summary"]
    assert summary["requests"] == {"total": 20, "completed": 20, "rejected": 0}
    assert summary["output_tokens"] == NUM_REQUESTS * OUTPUT_TOKENS
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p90"] <= summary["ttft_s"]["p99"]
    # gaps of 0: tokens merged into the first chunk behind a slow reader (bench.load)
    assert 0 <= summary["itl_s"]["p50"] <= summary["itl_s"]["p99"] and summary["itl_s"]["p99"] > 0
    assert summary["throughput_tok_s"] > 0 and summary["errors"] == []
    assert run["label"] == "four-clients" and "api_key" not in run["config"]
    assert run["worker_load"] is None  # a bare worker has no router series
    assert run["endpoint"]["workers_before"] is None


@pytest.mark.slow
def test_every_plot_is_a_png_the_html_embeds_and_links(synthetic_dir: Path) -> None:
    html = (synthetic_dir / "report.html").read_text()
    for name in RUN_PLOTS:
        width, height = png_size(synthetic_dir / name)
        assert width >= 800 and height >= 300, name
        assert f'href="{name}"' in html and f'alt="{name}"' in html
    assert html.count('src="data:image/png;base64,') == len(RUN_PLOTS)
    assert "four-clients" in html and "no <code>strata_router_*</code> series" in html
    assert not (synthetic_dir / "worker_load.png").exists()


@pytest.mark.slow
def test_trace_run_sends_each_request_at_its_scaled_arrival(trace_dir: Path) -> None:
    run = read_run(trace_dir)
    trace = make_synthetic_trace(10, block_size=16, rate_per_s=20.0, seed=3)
    assert [r["arrival_s"] for r in run["requests"]] == [round(r.arrival_s / 0.5, 4) for r in trace]
    for record, request in zip(run["requests"], trace, strict=True):
        assert record["status_code"] == 200, record["error"]
        assert record["output_tokens"] == request.output_length
        assert len(record["itl_ms"]) == request.output_length - 1
        assert record["arrival_s"] - 0.01 <= record["sent_s"] <= record["arrival_s"] + 0.5
    assert run["summary"]["hit_rate"] > 0  # the trace's shared prefixes hit the worker's cache


@pytest.mark.slow
def test_compare_report_names_both_runs(
    synthetic_dir: Path, trace_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "compare"
    args = ["serve", "--compare", str(synthetic_dir), str(trace_dir), "--out", str(out)]
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    for name in ("ttft_cdf.png", "itl_cdf.png", "throughput.png"):
        png_size(out / name)
        assert f'href="{name}"' in html
    assert "four-clients" in html and "trace-half-speed" in html
    assert set(json.loads((out / "compare.json").read_text())) == {
        "four-clients",
        "trace-half-speed",
    }


@pytest.mark.slow
def test_compare_refuses_one_run_and_equal_labels(synthetic_dir: Path, tmp_path: Path) -> None:
    one = CliRunner().invoke(bench_app, ["serve", "--compare", str(synthetic_dir), "--out", "x"])
    assert one.exit_code == 2
    run = read_run(synthetic_dir)
    with pytest.raises(ValueError, match="distinct labels"):
        write_compare_report([run, run], tmp_path)


# -- per-worker load from a frontend's /metrics (no frontend process needed) ----------------------

EXPOSITION = """\
# TYPE strata_router_decisions_total counter
strata_router_decisions_total{policy="kv",reason="cost",worker="local-0"} 5.0
strata_router_decisions_total{policy="kv",reason="only_healthy",worker="local-0"} 1.0
strata_router_decisions_total{policy="kv",reason="cost",worker="local-1"} 3.0
strata_router_decisions_created{policy="kv",reason="cost",worker="local-0"} 1.7e9
# TYPE strata_router_worker_active_requests gauge
strata_router_worker_active_requests{worker="local-0"} 2.0
strata_router_worker_active_requests{worker="local-1"} 0.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 7.0
"""


def test_router_series_are_parsed_per_worker() -> None:
    sample = parse_worker_series(EXPOSITION, t_s=1.5)
    assert sample is not None
    assert sample.active_requests == {"local-0": 2.0, "local-1": 0.0}
    assert sample.routed_total == {"local-0": 6.0, "local-1": 3.0}
    assert sample.policies == ("kv",)
    assert parse_worker_series('vllm:num_requests_running{model_name="m"} 7.0\n', 0) is None
    assert root_url("http://h:8000/v1/") == "http://h:8000"


def fake_worker_load() -> dict:
    samples = [
        {"t_s": 0.0, "active_requests": {"a": 0, "b": 0}, "routed_total": {"a": 0, "b": 0}},
        {"t_s": 0.5, "active_requests": {"a": 2, "b": 1}, "routed_total": {"a": 2, "b": 1}},
        {"t_s": 1.0, "active_requests": {"a": 1, "b": 2}, "routed_total": {"a": 3, "b": 3}},
    ]
    return {"interval_s": 0.5, "policies": ["kv"], "samples": samples}


def test_worker_series_gives_in_flight_and_routed_since_the_start() -> None:
    load = fake_worker_load()
    for sample in load["samples"]:  # a frontend that served an earlier run
        sample["routed_total"] = {w: n + 10 for w, n in sample["routed_total"].items()}
    times, active, routed = worker_series(load)
    assert times.tolist() == [0.0, 0.5, 1.0]
    assert active["a"].tolist() == [0, 2, 1]
    assert routed["a"].tolist() == [0, 2, 3] and routed["b"].tolist() == [0, 1, 3]


def test_throughput_counts_every_token_once_in_one_second_buckets() -> None:
    records = [  # tokens at 0.25, 0.75, 1.25, 1.75, 2.25 and 1.1, 1.4, 1.7
        {"sent_s": 0.0, "ttft_s": 0.25, "itl_ms": [500.0] * 4, "status_code": 200},
        {"sent_s": 1.0, "ttft_s": 0.1, "itl_ms": [300.0, 300.0], "status_code": 200},
        {"sent_s": 1.0, "ttft_s": None, "itl_ms": [], "status_code": 503},
    ]
    starts, rate = throughput_per_s({"requests": records})
    assert starts.tolist() == [0.0, 1.0]  # the last bucket covers 0.25 s: dropped
    assert rate.tolist() == [2.0, 5.0]


@pytest.mark.slow
def test_report_with_worker_load_draws_it_and_run_json_round_trips(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    run = copy.deepcopy(read_run(synthetic_dir))
    run["worker_load"] = fake_worker_load()
    run["summary"]["routed_per_worker"] = {"a": 3.0, "b": 3.0}
    write_run(run, tmp_path)
    assert read_run(tmp_path) == run
    html = write_report(run, tmp_path).read_text()
    png_size(tmp_path / "worker_load.png")
    assert 'href="worker_load.png"' in html and "a: 3 / b: 3" in html


def test_config_needs_exactly_one_load_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ServeBenchConfig(url="http://x/v1", out=tmp_path)
    with pytest.raises(ValidationError, match="exactly one"):
        ServeBenchConfig(url="http://x/v1", out=tmp_path, synthetic=True, trace=tmp_path / "t")
    cli = CliRunner().invoke(bench_app, ["serve", "--url", "http://x/v1", "--out", "o"])
    assert cli.exit_code == 2 and "exactly one" in cli.output
