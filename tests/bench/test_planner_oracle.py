"""``bench/planner_oracle.py``: the hindsight bound on what any schedule of pool sizes saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.planner_day import DayStudyConfig, simulation
from bench.planner_frontier import main as frontier_main
from bench.planner_oracle import (
    WindowTables,
    allocate,
    bound_gpu_hours,
    cheapest_at,
    evaluate,
    frontier,
    measure_tables,
)
from bench.planner_oracle import main as oracle_main
from bench.replay_planner import run_static
from tests.bench.conftest import tiny_trace


def _tables(arrivals: list[int], met: dict[int, list[int]]) -> WindowTables:
    return WindowTables(window_s=3600.0, first_measured=0, arrivals=arrivals, met=met)


def test_a_flat_day_leaves_nothing_to_save() -> None:
    """Every window alike: the best schedule at a static pool's SLA is that static pool."""
    tables = _tables([100] * 4, {1: [50] * 4, 2: [90] * 4, 3: [100] * 4})
    points = frontier(tables)
    assert [(p.sla_attainment, p.gpu_hours) for p in points] == [
        (0.5, 4.0), (0.9, 8.0), (1.0, 12.0)
    ]  # fmt: skip
    assert bound_gpu_hours(points, 0.9) == pytest.approx(8.0)
    assert bound_gpu_hours(points, 0.95) == pytest.approx(10.0)  # on the chord
    assert bound_gpu_hours(points, 1.01) is None


def test_a_quiet_window_runs_smaller() -> None:
    """One busy and one quiet hour: static 2 meets everything for 4 GPU-hours; the schedule
    (1, 2) does for 3: a quarter saved."""
    tables = _tables([100, 100], {1: [100, 0], 2: [100, 100]})
    assert allocate(tables, price=1e6) == (1, 1)
    assert allocate(tables, price=50.0) == (1, 2)
    assert allocate(tables, price=0.0) == (1, 2)  # free: the most met; a tie: the smaller
    assert evaluate(tables, (2, 2)) == (1.0, 4.0)
    assert bound_gpu_hours(frontier(tables), 1.0) == pytest.approx(3.0)
    assert cheapest_at(frontier(tables), 0.99).sizes == (1, 2)


def test_windows_before_the_measurement_are_not_counted() -> None:
    tables = WindowTables(3600.0, 1, [100, 100], {1: [0, 100], 2: [100, 100]})
    assert evaluate(tables, (1, 1)) == (1.0, 1.0)


def test_tables_count_what_the_static_pools_measure(tmp_path: Path) -> None:
    """Per-window counts add up to each static pool's own SLA figure and request count."""
    config = DayStudyConfig(trace=tiny_trace(tmp_path / "trace.jsonl"), peak_speedup=8.0,
                            start_s=20 * 3600.0, duration_s=1200.0, warmup_s=600.0, max_num_seqs=4,
                            max_num_batched_tokens=512, kv_capacity_tokens=4096)  # fmt: skip
    setup, _ = simulation(config)
    tables = measure_tables(setup, [1, 3], 300.0)
    assert tables.first_measured == 2 and len(tables.arrivals) == 6
    for n in (1, 3):
        static = run_static(setup, {"both": n}).figures(setup.price_per_gpu_hour)
        sla, gpu_hours = evaluate(tables, (n,) * 6)
        assert sum(tables.arrivals[2:]) == static["requests"]
        assert sla == pytest.approx(static["sla_attainment"])
        assert gpu_hours == pytest.approx(static["gpu_hours"])
    assert (
        evaluate(tables, (1,) * 6)[0] < evaluate(tables, (3,) * 6)[0]
    )  # the evening peak: 1 is short


def test_oracle_cli_bounds_static_pools_and_the_planner(tmp_path: Path, capsys) -> None:
    trace = tiny_trace(tmp_path / "trace.jsonl")
    common = ["--trace", str(trace), "--duration-s", "1200", "--speedup", "8"]
    frontier_file, out = tmp_path / "frontier.json", tmp_path / "oracle.json"
    frontier_main([*common, "--out", str(frontier_file), "--point", "lead-time"])
    oracle_main([*common, "--sizes", "1-2", "--out", str(out), "--frontier", str(frontier_file),
                 "--simulate", "0.5"])  # fmt: skip
    data = json.loads(out.read_text())
    rows = {r["point"]: r for r in data["report"]}
    assert set(rows) == {"static:1", "static:2", "lead-time"}
    for name in ("static:1", "static:2"):  # a static pool is one schedule: the bound is below
        assert rows[name]["bound_gpu_hours"] <= rows[name]["gpu_hours"] + 1e-9
    (simulated,) = data["simulated"]
    measured = data["tables"]["arrivals"][data["tables"]["first_measured"] :]
    assert simulated["requests"] == sum(measured)  # the schedule ran the same requests
    assert "hindsight bound" in capsys.readouterr().out
    before = out.read_text()
    oracle_main([*common, "--sizes", "2", "--out", str(out)])  # cached: nothing re-simulated
    assert json.loads(out.read_text())["tables"] == json.loads(before)["tables"]
    with pytest.raises(SystemExit) as exited:  # another day into the same file
        oracle_main([*common, "--curve", "sine", "--sizes", "1", "--out", str(out)])
    assert exited.value.code == 2


def test_oracle_cli_names_bad_sizes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "oracle.json"
    with pytest.raises(SystemExit) as exited:
        oracle_main(["--trace", str(tiny_trace(tmp_path / "t.jsonl")), "--sizes", "0-3",
                     "--out", str(out)])  # fmt: skip
    assert exited.value.code == 2 and "--sizes" in capsys.readouterr().err
    assert not out.exists()
