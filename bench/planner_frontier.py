"""SLA attainment against GPU-hours on the day study's day, for static pools, the planners under
chosen settings, and a pool sized with hindsight: is a planner's saving real at equal SLA?

    .venv/bin/python -m bench.planner_frontier --trace conversation_trace.jsonl \\
        --point static:9 --point static:10 --point lead-time \\
        --point 'lead-time:scaling.target_utilization=1.0' --point hindsight:300:1.15

The trace is Mooncake's conversation trace (FAST'25, Apache-2.0): ``FAST25-release/traces/
conversation_trace.jsonl`` in https://github.com/kvcache-ai/Mooncake. The day, workers, SLA and
lead time are ``bench/planner_day.py``'s (its defaults: 4x at the peak, lead time 180 s, TTFT
2 s, mean ITL 50 ms). Points:

* ``static:N``: N replicas all day;
* ``reactive[:key=value,...]``, ``lead-time[:key=value,...]``: the planner with these config
  overrides (dotted keys of ``PlannerConfig``, values parsed as YAML);
* ``perfect[:key=value,...]``: the lead-time planner fed the day's true request rate
  (``replay_planner.PerfectForecast``) instead of its predictor: what its other parts cost;
* ``hindsight:WINDOW_S:HEADROOM[:SQRT_HEADROOM]``: every window sized for its own arrivals by
  the capacity model, ``ceil(HEADROOM * a + SQRT_HEADROOM * sqrt(a))`` replicas for a load of
  ``a`` replicas (``serving/planner/sizing.py``; square-root staffing with ``HEADROOM`` 1),
  ordered one lead time ahead (``replay_planner.run_hindsight``): no planner can do better at
  following the load, so its curve bounds what any can save.

Disaggregated points (a prefill pool and a decode pool, ``bench/replay_fluid.py``'s routing and
KV transfer; GPU-hours count both pools; compared with the disaggregated static pools only):

* ``static:P+D``: P prefill and D decode replicas all day;
* ``reactive-pd[:key=value,...]``, ``lead-time-pd[:key=value,...]``: the planner sizing both
  roles (each with the study's SLA, lead time and bounds);
* ``hindsight-pd:WINDOW_S:HEADROOM[:SQRT_HEADROOM]``: each role's windows sized with hindsight
  by the capacity model's per-role capacity (``replay_planner.run_hindsight_roles``).

Each point's figures are merged into ``--out`` (one process per point keeps runs short and the
CPU lock released in between); the table covers every point in the file. For each point it
gives the static pool of equal SLA: the smallest static pool in the file whose SLA is at least
the point's, and the fractional pool interpolated between the two static points around it (a
static pool's SLA rises in steps; the interpolation compares without the step's luck).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from bench.planner_day import SLA_EQUAL_TOLERANCE, DayStudyConfig, planner_config, simulation
from bench.replay_planner import (
    DAILY_CURVES,
    PerfectForecast,
    hindsight_sizes,
    run_hindsight,
    run_hindsight_roles,
    run_planned,
    run_static,
)
from serving.planner.capacity import CapacityModel
from serving.planner.config import PlannerConfig, parse_config

PD_ROLES = ("prefill", "decode")
# What makes two runs the same day (DayStudyConfig fields): points of one file share them.
DAY_KEYS = ("daily_curve", "arrival_jitter_s", "peak_speedup", "trace", "duration_s")


def run_point(config: DayStudyConfig, point: str) -> dict[str, Any]:
    """Simulate one point of the frontier; its figures (plain values)."""
    kind, _, rest = point.partition(":")
    setup, profile = simulation(config)
    if kind == "static" and "+" in rest:
        prefill, decode = (int(x) for x in rest.split("+"))
        outcome = run_static(setup, {"prefill": prefill, "decode": decode}, name=point)
    elif kind == "static":
        outcome = run_static(setup, {"both": int(rest)}, name=point)
    elif kind == "hindsight-pd":
        window_s, headroom, *sqrt_headroom = (float(x) for x in rest.split(":"))
        base = planner_config(config, "lead-time", PD_ROLES)
        capacity = CapacityModel(
            profile, base.sla, target_utilization=base.scaling.target_utilization
        )
        sizes = {
            role: hindsight_sizes(
                setup, capacity, role, config.min_replicas, window_s, headroom, *sqrt_headroom
            )
            for role in PD_ROLES
        }
        outcome = run_hindsight_roles(setup, sizes, window_s, name=point)
    elif kind in ("reactive-pd", "lead-time-pd"):
        planner = with_overrides(planner_config(config, kind[:-3], PD_ROLES), rest)
        capacity = CapacityModel(
            profile, planner.sla, target_utilization=planner.scaling.target_utilization
        )
        outcome = run_planned(setup, planner, capacity, point)
    elif kind == "hindsight":
        window_s, headroom, *sqrt_headroom = (float(x) for x in rest.split(":"))
        base = planner_config(config, "lead-time")
        capacity = CapacityModel(
            profile, base.sla, target_utilization=base.scaling.target_utilization
        )
        sizes = hindsight_sizes(
            setup, capacity, "both", config.min_replicas, window_s, headroom, *sqrt_headroom
        )
        outcome = run_hindsight(setup, sizes, window_s, "both", name=point)
    elif kind in ("reactive", "lead-time", "perfect"):
        policy = "lead-time" if kind == "perfect" else kind
        planner = with_overrides(planner_config(config, policy), rest)
        capacity = CapacityModel(
            profile, planner.sla, target_utilization=planner.scaling.target_utilization
        )
        perfect = None
        if kind == "perfect":
            arrivals = (r.arrival_s for r in setup.requests())
            perfect = PerfectForecast(list(arrivals), planner.metrics.window_s)
        outcome = run_planned(setup, planner, capacity, point, perfect)
    else:
        raise ValueError(
            f"{point}: not static:N, static:P+D, reactive[-pd][:k=v], lead-time[-pd][:k=v], "
            "perfect[:k=v], hindsight[-pd]:W:H[:B]"
        )
    figures = outcome.figures(config.price_usd_per_gpu_hour)
    figures["peak_hour_sla_attainment"] = _busiest_hour(outcome.hourly)
    return figures


def with_overrides(planner: PlannerConfig, spec: str) -> PlannerConfig:
    """``planner`` with ``key=value,...`` applied (dotted keys; YAML values)."""
    if not spec:
        return planner
    data = planner.model_dump(mode="json")
    for item in spec.split(","):
        dotted, _, value = item.partition("=")
        node = data
        *parents, leaf = dotted.strip().split(".")
        for key in parents:
            node = node[key]
        node[leaf] = yaml.safe_load(value)
    return parse_config(data, source=spec)


def _busiest_hour(hourly: dict[int, list[int]]) -> float:
    """SLA attainment over the hour with the most requests."""
    busiest = max(hourly.items(), key=lambda item: item[1][0])
    return busiest[1][1] / busiest[1][0]


def equal_sla_static(
    points: dict[str, dict[str, Any]], sla: float, disagg: bool = False
) -> dict[str, Any] | None:
    """The static pool of SLA ``sla``: the smallest simulated one at or above it, and the
    fractional size interpolated between the static points around it (GPU-hours scale with the
    size). None without a static point at or above ``sla``. ``disagg``: among the static
    prefill + decode pools (``static:P+D``, size ``P + D``; below ``sla``, a size's best split),
    else among the aggregated ones."""
    statics = sorted(
        (
            (_static_size(name), p)
            for name, p in points.items()
            if name.startswith("static:") and ("+" in name) == disagg
        ),
        key=lambda item: (item[0], item[1]["sla_attainment"]),  # a size's best split last
    )
    above = [(n, p) for n, p in statics if p["sla_attainment"] >= sla - SLA_EQUAL_TOLERANCE]
    if not above:
        return None
    n, p = above[0]
    below = [(m, q) for m, q in statics if m < n]
    size = float(n)
    if below:
        m, q = below[-1]
        low, high = q["sla_attainment"], p["sla_attainment"]
        size = min(m + (n - m) * (sla - low) / (high - low), n) if high > low else float(n)
    return {"replicas": n, "gpu_hours": p["gpu_hours"], "interpolated_replicas": size,
            "interpolated_gpu_hours": p["gpu_hours"] * size / n}  # fmt: skip


def _static_size(name: str) -> int:
    return sum(int(x) for x in name.split(":")[1].split("+"))


def is_disagg(name: str) -> bool:
    kind, _, rest = name.partition(":")
    return kind.endswith("-pd") or (kind == "static" and "+" in rest)


def print_frontier(points: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SLA attainment vs GPU-hours (one simulated day)")
    for column in ("point", "SLA met", "busiest hour", "GPU-hours", "replicas mean/max",
                   "static of equal SLA", "saved", "saved (interp.)"):  # fmt: skip
        table.add_column(column, justify="right")
    for name, p in sorted(points.items(), key=lambda item: item[1]["gpu_hours"]):
        same = equal_sla_static(points, p["sla_attainment"], is_disagg(name))
        saved = saved_interp = equal = "-"
        if same is not None:
            equal = f"{same['replicas']} ({same['interpolated_replicas']:.2f})"
            saved = f"{1 - p['gpu_hours'] / same['gpu_hours']:.1%}"
            saved_interp = f"{1 - p['gpu_hours'] / same['interpolated_gpu_hours']:.1%}"
        table.add_row(
            name, f"{p['sla_attainment']:.2%}", f"{p['peak_hour_sla_attainment']:.2%}",
            f"{p['gpu_hours']:.1f}", f"{p['replicas']['mean']:.2f} / {p['replicas']['max']}",
            equal, saved, saved_interp,
        )  # fmt: skip
    Console(width=150).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL trace.")
    parser.add_argument("--point", action="append", default=[], help="See the module docstring.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner-frontier.json"))
    parser.add_argument("--speedup", type=float, default=4.0, help="Trace speed-up at the peak.")
    parser.add_argument("--duration-s", type=float, default=86_400.0)
    parser.add_argument("--curve", choices=tuple(DAILY_CURVES), default="chat",
                        help="The day's shape (bench/replay_planner.py DAILY_CURVES).")  # fmt: skip
    parser.add_argument("--arrival-jitter-s", type=float, default=3.0,
                        help="Spread arrivals over this many trace seconds (0 for an Azure "
                        "trace's exact times).")  # fmt: skip
    args = parser.parse_args(argv)
    config = DayStudyConfig(
        trace=args.trace, peak_speedup=args.speedup, duration_s=args.duration_s,
        daily_curve=args.curve, arrival_jitter_s=args.arrival_jitter_s,
    )  # fmt: skip
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    this_day = config.model_dump(mode="json")
    if saved and any(saved["config"].get(k) != this_day[k] for k in DAY_KEYS):
        parser.error(f"--out {args.out} holds points of another day (--trace, --speedup, "
                     "--curve, --arrival-jitter-s or --duration-s); name another file")  # fmt: skip
    points = saved.get("points", {})
    for point in args.point:
        started = time.process_time()
        points[point] = run_point(config, point)
        points[point]["sim_cpu_s"] = time.process_time() - started
        print(f"{point}: SLA {points[point]['sla_attainment']:.2%}, "
              f"{points[point]['gpu_hours']:.1f} GPU-hours", flush=True)  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": config.model_dump(mode="json"),
                                        "points": points}, indent=1) + "\n")  # fmt: skip
    print_frontier(points)


if __name__ == "__main__":
    main()
