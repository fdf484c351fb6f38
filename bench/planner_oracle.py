"""How much can any schedule of pool sizes save on the day study's day? A bound from hindsight.

    .venv/bin/python -m bench.planner_oracle --trace conversation_trace.jsonl --sizes 1-16 \\
        --frontier bench/results/planner-frontier.json --simulate 0.963

NOTE: the method. Each static pool of ``n`` replicas (``--sizes``) is simulated over the day
(``bench/planner_day.py``'s requests, workers and SLA) and its SLA-met requests are counted per
``--window-s`` window of arrival: ``met[n][w]``. A schedule gives every window its own size; if a
window's outcome depended only on its own size, the schedule that meets the most requests for a
GPU-hour budget would solve ``max sum_w met[n_w][w] - lam * n_w * window_h`` for some price
``lam``, window by window (a Lagrangian relaxation of a separable knapsack). Sweeping ``lam``
gives the vertices of the lower convex hull of (SLA, GPU-hours) over all schedules; between two
vertices the hull is a straight line, the best any mix of them could do. So the hull is a lower
bound on the GPU-hours of any 5-minute schedule (with hindsight, no lead time, no transition
cost) at a given SLA, under the separability approximation (a window's queue carries in from
the one before; measured under one static size, not the neighbour's). ``--simulate SLA`` runs the
cheapest vertex at or above ``SLA`` through ``replay_planner.run_hindsight`` (sizes ordered one
lead time ahead and paid from then, drains on the way down) to measure what it really attains.

Pure core: ``allocate``, ``frontier``, ``bound_gpu_hours``; ``measure_tables`` simulates;
``main`` is the shell (the tables are cached in ``--out``: they take minutes).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.planner_day import DayStudyConfig, simulation
from bench.planner_frontier import DAY_KEYS, equal_sla_static, is_disagg
from bench.replay_planner import DAILY_CURVES, SimSetup, run_hindsight, run_static
from serving.planner.config import Role

_ROLE: Role = "both"


@dataclass(frozen=True)
class WindowTables:
    """Per window of arrival: requests, and requests that met the SLA under each static size."""

    window_s: float
    first_measured: int  # the first window after the warm-up (earlier ones are not counted)
    arrivals: list[int]  # per window, over the whole run (warm-up included)
    met: dict[int, list[int]]  # static size -> per window
    gpus_per_replica: int = 1

    @property
    def sizes(self) -> list[int]:
        return sorted(self.met)

    def to_json(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "first_measured": self.first_measured,
                "arrivals": self.arrivals, "met": {str(n): m for n, m in self.met.items()},
                "gpus_per_replica": self.gpus_per_replica}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WindowTables:
        met = {int(n): list(m) for n, m in data["met"].items()}
        return cls(data["window_s"], data["first_measured"], list(data["arrivals"]), met,
                   data.get("gpus_per_replica", 1))  # fmt: skip


@dataclass(frozen=True)
class OraclePoint:
    """One vertex of the hull: a schedule (a size per measured window) and what it attains."""

    price: float  # lam: SLA-met requests one GPU-hour must buy to be worth it
    sla_attainment: float
    gpu_hours: float
    sizes: tuple[int, ...]  # per window, over the whole run (warm-up included)


# -- the pure core -----------------------------------------------------------------------------


def allocate(tables: WindowTables, price: float) -> tuple[int, ...]:
    """Per window, the size with the most SLA-met requests less ``price`` per GPU-hour (ties:
    the smaller size)."""
    return next(_allocations(tables, [price]))


def _allocations(tables: WindowTables, prices: Iterable[float]) -> Iterator[tuple[int, ...]]:
    """``allocate`` at each price; the tables become arrays once."""
    sizes = np.array(tables.sizes)
    met = np.array([tables.met[n] for n in sizes], dtype=float)  # size x window
    gpu_hours = sizes * tables.gpus_per_replica * tables.window_s / 3600.0
    for price in prices:
        score = met - price * gpu_hours[:, None]
        yield tuple(int(n) for n in sizes[score.argmax(axis=0)])  # argmax: the first (smallest)


def evaluate(tables: WindowTables, sizes: tuple[int, ...]) -> tuple[float, float]:
    """(SLA attainment, GPU-hours) of a schedule over the measured windows, by the tables."""
    measured = range(tables.first_measured, len(tables.arrivals))
    met = sum(tables.met[sizes[w]][w] for w in measured)
    requests = sum(tables.arrivals[w] for w in measured)
    replica_windows = sum(sizes[w] for w in measured)
    gpu_hours = replica_windows * tables.gpus_per_replica * tables.window_s / 3600.0
    return (met / requests if requests else 0.0), gpu_hours


def frontier(tables: WindowTables, prices: np.ndarray | None = None) -> list[OraclePoint]:
    """The hull's vertices found by sweeping the price, cheapest first."""
    if prices is None:
        prices = np.geomspace(1e-2, 1e7, 600)
    points: dict[tuple[int, ...], OraclePoint] = {}
    for price, sizes in zip(prices, _allocations(tables, prices), strict=True):
        if sizes not in points:
            points[sizes] = OraclePoint(float(price), *evaluate(tables, sizes), sizes)
    return sorted(points.values(), key=lambda p: (p.gpu_hours, p.sla_attainment))


def bound_gpu_hours(points: list[OraclePoint], sla: float) -> float | None:
    """The hull's GPU-hours at ``sla`` (linear between the vertices around it); None above the
    best vertex."""
    hull = _lower_hull(points)
    for low, high in itertools.pairwise(hull):
        if low.sla_attainment <= sla <= high.sla_attainment:
            span = high.sla_attainment - low.sla_attainment
            share = (sla - low.sla_attainment) / span if span > 0 else 1.0
            return low.gpu_hours + share * (high.gpu_hours - low.gpu_hours)
    if hull and sla <= hull[0].sla_attainment:
        return hull[0].gpu_hours
    return None


def cheapest_at(points: list[OraclePoint], sla: float) -> OraclePoint | None:
    """The cheapest vertex attaining at least ``sla``."""
    return next((p for p in points if p.sla_attainment >= sla), None)


def _lower_hull(points: list[OraclePoint]) -> list[OraclePoint]:
    """The vertices on the hull: rising SLA, each dearer, and concave (a Lagrangian sweep finds
    exactly these; a coarse price grid can add points inside, which this drops)."""
    hull: list[OraclePoint] = []
    for p in sorted(points, key=lambda p: (p.gpu_hours, -p.sla_attainment)):
        if hull and p.sla_attainment <= hull[-1].sla_attainment:
            continue
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], p):
            hull.pop()  # the middle vertex lies under the chord: not on the hull
        hull.append(p)
    return hull


def _slope(a: OraclePoint, b: OraclePoint) -> float:
    """SLA gained per GPU-hour from ``a`` to ``b``."""
    return (b.sla_attainment - a.sla_attainment) / max(b.gpu_hours - a.gpu_hours, 1e-12)


# -- the simulation ----------------------------------------------------------------------------


def measure_tables(setup: SimSetup, sizes: list[int], window_s: float,
                   progress=lambda line: None) -> WindowTables:  # fmt: skip
    """Simulate a static pool of each size over the day and count per window of arrival."""
    num_windows = int(np.ceil(setup.end_s / window_s))
    arrivals = [0] * num_windows
    for r in setup.requests():
        arrivals[min(int(r.arrival_s // window_s), num_windows - 1)] += 1
    met: dict[int, list[int]] = {}
    for n in sizes:
        counts = [0] * num_windows

        def done(r, counts=counts) -> None:
            if r.ttft_s <= setup.sla_ttft_s and r.itl_s <= setup.sla_itl_s:
                counts[min(int(r.arrival_s // window_s), num_windows - 1)] += 1

        outcome = run_static(setup, {_ROLE: n}, f"static:{n}", on_done=done)
        met[n] = counts
        progress(f"static:{n}: {outcome.met_sla / max(len(outcome.ttft_s), 1):.2%} SLA met")
    first = int(setup.warmup_s // window_s)
    return WindowTables(window_s, first, arrivals, met, setup.gpus_per_replica)


def simulate(setup: SimSetup, tables: WindowTables, point: OraclePoint) -> dict[str, Any]:
    """Run a vertex's schedule through the simulator (lead time, drains): what it attains."""
    outcome = run_hindsight(setup, point.sizes, tables.window_s, _ROLE, name="oracle")
    return outcome.figures(setup.price_per_gpu_hour)


# -- the shell ---------------------------------------------------------------------------------


def _parse_sizes(spec: str) -> list[int]:
    sizes: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        sizes.update(range(int(low), int(high or low) + 1))
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes {spec!r}: want sizes >= 1 like 1-16 or 4,6,8")
    return sorted(sizes)


def report(tables: WindowTables, points: list[OraclePoint],
           frontier_points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """Per static size and per frontier point: its SLA, GPU-hours, the static pool of equal SLA
    (interpolated) and the hull's bound at that SLA."""
    statics = {f"static:{n}": dict(zip(("sla_attainment", "gpu_hours"),
                                       evaluate(tables, (n,) * len(tables.arrivals)), strict=True))
               for n in tables.sizes}  # fmt: skip
    rows = []
    for name, p in {**statics, **frontier_points}.items():
        same = equal_sla_static(statics | frontier_points, p["sla_attainment"])
        bound = bound_gpu_hours(points, p["sla_attainment"])
        static_h = same["interpolated_gpu_hours"] if same else None
        rows.append({"point": name, "sla_attainment": p["sla_attainment"],
                     "gpu_hours": p["gpu_hours"], "static_gpu_hours": static_h,
                     "bound_gpu_hours": bound,
                     "saved": 1 - p["gpu_hours"] / static_h if static_h else None,
                     "bound_saved": (1 - bound / static_h) if static_h and bound else None,
                     })  # fmt: skip
    return sorted(rows, key=lambda r: r["gpu_hours"])


def print_report(rows: list[dict[str, Any]], simulated: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    table = Table(title="The most any 5-minute schedule saves at equal SLA (hindsight bound)")
    for column in ("point", "SLA met", "GPU-hours", "static of equal SLA (interp.)", "saved",
                   "bound: GPU-hours", "bound: saved"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in rows:
        static_h, bound = r["static_gpu_hours"], r["bound_gpu_hours"]
        table.add_row(r["point"], f"{r['sla_attainment']:.2%}", f"{r['gpu_hours']:.1f}",
                      "-" if static_h is None else f"{static_h:.1f}", pct(r["saved"]),
                      "-" if bound is None else f"{bound:.1f}", pct(r["bound_saved"]))  # fmt: skip
    for s in simulated:
        table.add_row(f"oracle schedule (asked {s['asked']:.2%}), simulated",
                      f"{s['sla_attainment']:.2%}", f"{s['gpu_hours']:.1f}", "-", "-",
                      f"{s['tables_gpu_hours']:.1f} by the tables", "-")  # fmt: skip
    Console(width=150).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="Mooncake JSONL or Azure CSV.")
    parser.add_argument("--sizes", default="1-16", help="Static sizes to tabulate: 1-16, 4,6,8.")
    parser.add_argument("--window-s", type=float, default=300.0)
    parser.add_argument("--speedup", type=float, default=4.0, help="Trace speed-up at the peak.")
    parser.add_argument("--duration-s", type=float, default=86_400.0)
    parser.add_argument("--curve", choices=tuple(DAILY_CURVES), default="chat")
    parser.add_argument("--arrival-jitter-s", type=float, default=3.0)
    parser.add_argument("--frontier", type=Path, help="bench.planner_frontier JSON of this day.")
    parser.add_argument(
        "--simulate",
        type=float,
        action="append",
        default=[],
        metavar="SLA",
        help="Simulate the cheapest schedule of at least this SLA (0-1).",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/planner-oracle.json"))
    args = parser.parse_args(argv)
    try:
        sizes = _parse_sizes(args.sizes)
    except ValueError as e:
        parser.error(str(e))
    config = DayStudyConfig(
        trace=args.trace, peak_speedup=args.speedup, duration_s=args.duration_s,
        daily_curve=args.curve, arrival_jitter_s=args.arrival_jitter_s,
    )  # fmt: skip
    day = {k: v for k, v in config.model_dump(mode="json").items() if k in DAY_KEYS}
    frontier_points = _frontier_points(parser, args.frontier, day)
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if saved and (saved.get("day") != day or saved["tables"]["window_s"] != args.window_s):
        parser.error(f"--out {args.out} holds tables of another day or window; name another file")
    setup, _ = simulation(config)
    tables = WindowTables.from_json(saved["tables"]) if saved else None
    missing = [n for n in sizes if tables is None or n not in tables.met]
    if missing:
        fresh = measure_tables(setup, missing, args.window_s, lambda line: print(line, flush=True))
        met = {**(tables.met if tables else {}), **fresh.met}
        tables = WindowTables(fresh.window_s, fresh.first_measured, fresh.arrivals, met,
                              fresh.gpus_per_replica)  # fmt: skip
    assert tables is not None
    points = frontier(tables)
    simulated = []
    for sla in args.simulate:
        vertex = cheapest_at(points, sla)
        if vertex is None:
            parser.error(f"--simulate {sla}: above the best schedule's SLA; add larger --sizes")
        figures = simulate(setup, tables, vertex)
        simulated.append({"asked": sla, "tables_sla": vertex.sla_attainment,
                          "tables_gpu_hours": vertex.gpu_hours, **figures})  # fmt: skip
    rows = report(tables, points, frontier_points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"day": day, "tables": tables.to_json(), "report": rows,
                                    "simulated": simulated}, indent=1) + "\n")  # fmt: skip
    print_report(rows, simulated)


def _frontier_points(parser: argparse.ArgumentParser, path: Path | None,
                     day: dict[str, Any]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The non-static, aggregated points of a frontier file of the same day."""
    if path is None:
        return {}
    if not path.is_file():
        parser.error(f"--frontier {path}: no such file")
    data = json.loads(path.read_text())
    theirs = {k: data["config"].get(k) for k in DAY_KEYS}
    if theirs != day:
        parser.error(f"--frontier {path}: points of another day ({theirs} against {day})")
    return {name: p for name, p in data["points"].items()
            if not name.startswith("static:") and not is_disagg(name)}  # fmt: skip


if __name__ == "__main__":
    main()
