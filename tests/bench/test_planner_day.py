"""``strata bench replay --planner``: the day study end to end on a tiny trace and small workers
(the real core over the virtual connector, in virtual time; seconds of wall time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench.planner_day import (
    DayStudyConfig,
    equal_sla_statics,
    planner_config,
    simulation,
    verdict,
)
from bench.planner_frontier import equal_sla_static
from bench.planner_frontier import main as frontier_main
from bench.replay_fluid import SimRequest
from bench.replay_planner import (
    DAILY_CURVES,
    PerfectForecast,
    WindowStats,
    day_requests,
    diurnal_share,
    run_hindsight,
    run_hindsight_roles,
    run_planned,
    sine_share,
)
from bench.trace import load_mooncake
from serving.planner.capacity import CapacityModel
from tests.bench.conftest import tiny_trace
from workflows.bench_cli import app as bench_app


def test_replay_planner_compares_static_and_the_planner(tmp_path: Path) -> None:
    config = tmp_path / "planner.yaml"
    config.write_text(yaml.safe_dump({
        "model": "x", "profile": "unused.json", "roles": {"both": {}},
        "predictor": {"kind": "moving_average"}, "scaling": {"interval_s": 30},
    }))  # fmt: skip
    out = tmp_path / "study.json"
    result = CliRunner().invoke(bench_app, [
        "replay", "--trace", str(tiny_trace(tmp_path / "trace.jsonl")),
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
        "replay", "--trace", str(tiny_trace(tmp_path / "trace.jsonl")), "--planner", "psychic",
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


def test_hindsight_pool_has_each_window_s_size_on_time(tmp_path: Path) -> None:
    """The hindsight reference: every window's replicas serve from its start, paid from one
    lead time before; GPU-hours follow the sizes."""
    config = DayStudyConfig(trace=tiny_trace(tmp_path / "trace.jsonl"), peak_speedup=8.0,
                            duration_s=1200.0, warmup_s=600.0, lead_time_s=60.0,
                            max_num_seqs=4, max_num_batched_tokens=512,
                            kv_capacity_tokens=4096)  # fmt: skip
    setup, _ = simulation(config)
    sizes = [1, 2, 3, 1, 2, 2]  # 300 s windows over the warm-up and the measured 1200 s
    outcome = run_hindsight(setup, sizes, 300.0, "both")
    assert outcome.replicas == [(600.0, 3), (900.0, 1), (1200.0, 2), (1500.0, 2)]
    # Measured from 600 s: 3 + 1 + 2 + 2 replicas x 300 s, plus the lead time of the two
    # replicas ordered for 1200 s (drained replicas pay until their streams end: >= 0).
    paid_s = outcome.gpu_s
    assert (3 + 1 + 2 + 2) * 300 + 60 <= paid_s <= (3 + 1 + 2 + 2) * 300 + 60 + 2 * 30
    assert outcome.rejected == 0 and outcome.ttft_s


def test_equal_sla_static_interpolates_between_static_pools() -> None:
    points = {
        "static:9": {"sla_attainment": 0.90, "gpu_hours": 216.0},
        "static:10": {"sla_attainment": 0.98, "gpu_hours": 240.0},
        "lead-time": {"sla_attainment": 0.96, "gpu_hours": 180.0},
    }
    same = equal_sla_static(points, 0.96)
    assert same is not None
    assert same["replicas"] == 10 and same["gpu_hours"] == 240.0
    assert abs(same["interpolated_replicas"] - 9.75) < 1e-9
    assert abs(same["interpolated_gpu_hours"] - 234.0) < 1e-9
    assert equal_sla_static(points, 0.99) is None  # no static pool that good was simulated


def test_frontier_merges_points_into_one_file(tmp_path: Path, capsys) -> None:
    trace, out = tiny_trace(tmp_path / "trace.jsonl"), tmp_path / "frontier.json"
    common = ["--trace", str(trace), "--duration-s", "1200", "--speedup", "8", "--out", str(out)]
    frontier_main([*common, "--point", "static:1"])
    frontier_main(
        [
            *common,
            "--point",
            "hindsight:300:1.0:0.5",
            "--point",
            "lead-time:predictor.kind=moving_average,scaling.interval_s=30",
        ]
    )
    points = json.loads(out.read_text())["points"]
    assert set(points) == {
        "static:1",
        "hindsight:300:1.0:0.5",
        "lead-time:predictor.kind=moving_average,scaling.interval_s=30",
    }
    assert all(p["requests"] == points["static:1"]["requests"] > 0 for p in points.values())
    assert "static of equal SLA" in capsys.readouterr().out


def test_verdict_compares_with_the_static_pool_of_equal_sla() -> None:
    def row(policy: str, sla: float, gpu_hours: float) -> dict:
        return {"policy": policy, "sla_attainment": sla, "gpu_hours": gpu_hours}

    v = verdict([row("static", 0.90, 216.0), row("reactive", 0.93, 180.0),
                 row("lead-time", 0.96, 180.0), row("static-10", 0.98, 240.0)])  # fmt: skip
    assert v["sla_at_least_static"] and not v["saves_30_percent"]
    assert v["equal_sla_static_replicas"] == 10
    assert abs(v["gpu_hours_saved_vs_equal_sla_static"] - 0.25) < 1e-9
    assert abs(v["equal_sla_static_interpolated_replicas"] - 9.75) < 1e-9
    assert abs(v["gpu_hours_saved_vs_interpolated_static"] - (1 - 180 / 234)) < 1e-9
    assert v["more_sla_than_reactive"]


def test_sla_attainments_a_request_in_a_million_apart_count_as_equal() -> None:
    """Near a 100% ceiling: static 8 (99.9986%) is the pool of (c)'s SLA (99.9999%), not a
    static-10 that happens to lose no request (the study once printed 30.5% saved from that)."""

    def row(policy: str, sla: float, gpu_hours: float) -> dict:
        return {"policy": policy, "sla_attainment": sla, "gpu_hours": gpu_hours}

    static, lead = row("static", 0.999986, 192.0), row("lead-time", 0.999999, 166.7)
    v = verdict([static, lead, row("static-9", 0.999998, 216.0), row("static-10", 1.0, 240.0)])
    assert v["sla_at_least_static"]
    assert abs(v["gpu_hours_saved_vs_static"] - (1 - 166.7 / 192.0)) < 1e-9
    assert "equal_sla_static_replicas" not in v  # static itself is the pool of equal SLA
    points = {"static:7": {"sla_attainment": 0.8756, "gpu_hours": 168.0},
              "static:8": {"sla_attainment": 0.999986, "gpu_hours": 192.0},
              "static:10": {"sla_attainment": 1.0, "gpu_hours": 240.0}}  # fmt: skip
    same = equal_sla_static(points, 0.999999)
    assert same is not None and same["replicas"] == 8 and same["interpolated_replicas"] == 8
    below = equal_sla_static(points, 0.9995)  # below static 8 by more than the tolerance
    assert below is not None and below["replicas"] == 8 and 7 < below["interpolated_replicas"] < 8


def test_study_adds_static_pools_until_one_attains_lead_time_sla(tmp_path: Path) -> None:
    config = DayStudyConfig(trace=tiny_trace(tmp_path / "trace.jsonl"), peak_speedup=8.0,
                            duration_s=600.0, warmup_s=0.0, max_num_seqs=4,
                            max_num_batched_tokens=512, kv_capacity_tokens=4096)  # fmt: skip
    setup, _ = simulation(config)
    results = [{"policy": "static", "sla_attainment": 0.5},
               {"policy": "lead-time", "sla_attainment": 0.99}]  # fmt: skip
    extra = equal_sla_statics(setup, config, results, 1, progress=lambda line: None)
    assert [r["policy"] for r in extra] == ["static-2"]  # two replicas serve every request
    assert extra[0]["sla_attainment"] == 1.0 and extra[0]["replicas"]["max"] == 2


def test_hindsight_pools_per_role_serve_on_time(tmp_path: Path) -> None:
    """Disaggregated hindsight: each role's window has its own size; the replica count is the
    sum; every request is prefilled on a prefill worker and decoded on a decode worker."""
    config = DayStudyConfig(trace=tiny_trace(tmp_path / "trace.jsonl"), peak_speedup=8.0,
                            duration_s=1200.0, warmup_s=600.0, lead_time_s=60.0,
                            max_num_seqs=4, max_num_batched_tokens=512,
                            kv_capacity_tokens=4096)  # fmt: skip
    setup, _ = simulation(config)
    sizes = {"prefill": [1, 1, 2, 1, 1, 1], "decode": [1, 2, 2, 1, 2, 2]}
    outcome = run_hindsight_roles(setup, sizes, 300.0, "hindsight-pd")
    assert outcome.replicas == [(600.0, 4), (900.0, 2), (1200.0, 3), (1500.0, 3)]
    assert (4 + 2 + 3 + 3) * 300 + 60 <= outcome.gpu_s <= (4 + 2 + 3 + 3) * 300 + 60 + 3 * 30
    assert outcome.rejected == 0 and outcome.ttft_s


def test_equal_sla_static_keeps_disaggregated_pools_apart() -> None:
    points = {
        "static:9": {"sla_attainment": 0.99, "gpu_hours": 216.0},
        "static:4+4": {"sla_attainment": 0.90, "gpu_hours": 192.0},
        "static:3+5": {"sla_attainment": 0.60, "gpu_hours": 192.0},  # a worse split: ignored
        "static:5+5": {"sla_attainment": 0.98, "gpu_hours": 240.0},
    }
    same = equal_sla_static(points, 0.96, disagg=True)
    assert same is not None and same["replicas"] == 10
    assert abs(same["interpolated_replicas"] - 9.5) < 1e-9
    assert equal_sla_static(points, 0.96)["replicas"] == 9  # the aggregated pools only


def test_frontier_runs_disaggregated_points(tmp_path: Path, capsys) -> None:
    trace, out = tiny_trace(tmp_path / "trace.jsonl"), tmp_path / "frontier.json"
    common = ["--trace", str(trace), "--duration-s", "1200", "--speedup", "8", "--out", str(out)]
    frontier_main(
        [*common, "--point", "static:1+1", "--point", "hindsight-pd:300:1.0",
         "--point", "lead-time-pd:scaling.interval_s=30"]
    )  # fmt: skip
    points = json.loads(out.read_text())["points"]
    assert len(points) == 3
    assert all(p["requests"] == points["static:1+1"]["requests"] > 0 for p in points.values())
    assert points["static:1+1"]["gpu_hours"] > 0 and points["static:1+1"]["replicas"]["max"] == 2
    assert "static of equal SLA" in capsys.readouterr().out


def test_daily_curves_have_the_documented_shape() -> None:
    fine = [i * 60.0 for i in range(24 * 60)]
    assert sine_share(4 * 3600.0) == pytest.approx(0.2)
    assert sine_share(16 * 3600.0) == pytest.approx(1.0)
    assert max(map(sine_share, fine)) == pytest.approx(1.0)
    assert sum(map(sine_share, fine)) / len(fine) == pytest.approx(0.6)
    chat = [diurnal_share(t) for t in fine]
    assert max(chat) == 1.0 and min(chat) == 0.2  # the same peak/trough as the sine
    assert sum(chat) / len(chat) == pytest.approx(0.67, abs=0.01)
    assert DAILY_CURVES["chat"] is diurnal_share and DAILY_CURVES["sine"] is sine_share


def test_day_requests_follow_the_chosen_curve(tmp_path: Path) -> None:
    trace = load_mooncake(tiny_trace(tmp_path / "trace.jsonl"))
    for name, curve in DAILY_CURVES.items():
        per_hour = [0] * 24
        for request in day_requests(trace, peak_speedup=1.0, share=curve, seed=1):
            per_hour[int(request.arrival_s // 3600)] += 1
        expected = [3600 * curve(h * 3600.0 + 1800.0) for h in range(24)]  # one prompt a second
        for count, mean in zip(per_hour, expected, strict=True):
            assert abs(count - mean) < 5 * mean**0.5, (name, per_hour)


def test_replay_planner_takes_a_daily_curve_and_names_a_bad_one(tmp_path: Path) -> None:
    trace, out = tiny_trace(tmp_path / "trace.jsonl"), tmp_path / "study.json"
    common = ["replay", "--trace", str(trace), "--planner", "static", "--speedup", "8",
              "--duration-s", "1200", "--max-num-seqs", "4", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(bench_app, [*common, "--daily-curve", "moon"])
    assert result.exit_code == 2 and "daily_curve" in result.output
    assert not out.exists()
    result = CliRunner().invoke(bench_app, [*common, "--daily-curve", "sine"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["config"]["daily_curve"] == "sine"


def test_frontier_keeps_each_curve_in_its_own_file(tmp_path: Path) -> None:
    trace, out = tiny_trace(tmp_path / "trace.jsonl"), tmp_path / "frontier.json"
    common = ["--trace", str(trace), "--duration-s", "1200", "--speedup", "8", "--out", str(out)]
    frontier_main([*common, "--curve", "sine", "--point", "static:1"])
    before = out.read_text()
    with pytest.raises(SystemExit) as exited:
        frontier_main([*common, "--point", "static:2"])  # chat: another day
    assert exited.value.code == 2
    assert out.read_text() == before


def test_perfect_forecast_reads_the_rate_off_the_days_arrivals() -> None:
    arrivals = [float(i) for i in range(0, 120)] + [120 + i / 4 for i in range(240)]  # 1, then 4/s
    perfect = PerfectForecast(arrivals, window_s=60.0)
    assert perfect.forecast(0.0, [60.0, 120.0, 180.0], quantile=0.9) == [1.0, 1.0, 4.0]
    perfect.observe(60.0, 100.0)  # observations change nothing
    assert perfect.forecast(60.0, [0.0, 90.0]) == [1.0, 2.5]


def test_frontier_runs_the_planner_with_a_perfect_forecast(tmp_path: Path) -> None:
    trace, out = tiny_trace(tmp_path / "trace.jsonl"), tmp_path / "frontier.json"
    common = ["--trace", str(trace), "--duration-s", "1200", "--speedup", "8", "--out", str(out)]
    frontier_main([*common, "--point", "perfect:scaling.interval_s=30", "--point", "static:1"])
    points = json.loads(out.read_text())["points"]
    perfect = points["perfect:scaling.interval_s=30"]
    assert perfect["requests"] == points["static:1"]["requests"] > 0
    assert perfect["gpu_hours"] > 0


def test_planner_sizes_from_an_injected_forecast(tmp_path: Path) -> None:
    """``run_planned``'s ``rate_predictor`` replaces the planner's own: told of ten times the
    day's arrivals, it holds a larger pool than when told the truth."""
    config = DayStudyConfig(trace=tiny_trace(tmp_path / "trace.jsonl"), peak_speedup=8.0,
                            start_s=20 * 3600.0, duration_s=1200.0, warmup_s=600.0)  # fmt: skip
    setup, profile = simulation(config)
    planner = planner_config(config, "lead-time")
    capacity = CapacityModel(profile, planner.sla)
    arrivals = [r.arrival_s for r in setup.requests()]
    tenfold = [t + i / 10 for t in arrivals for i in range(10)]
    truth = run_planned(setup, planner, capacity, "truth", PerfectForecast(arrivals))
    inflated = run_planned(setup, planner, capacity, "x10", PerfectForecast(tenfold))
    assert truth.figures(4.0)["requests"] == inflated.figures(4.0)["requests"]
    assert inflated.gpu_s > truth.gpu_s
