"""A day of traffic under three ways to size the pool: ``strata bench replay --planner``.

    .venv/bin/strata bench replay --trace conversation_trace.jsonl \\
        --planner static,reactive,lead-time --lead-time-s 180 --speedup 4

The trace (required) is Mooncake's conversation trace (FAST'25; Apache-2.0), one hour of Kimi's
requests: ``FAST25-release/traces/conversation_trace.jsonl`` in
https://github.com/kvcache-ai/Mooncake (``curl -LO https://raw.githubusercontent.com/kvcache-ai/
Mooncake/main/FAST25-release/traces/conversation_trace.jsonl``). Any Mooncake-format JSONL works,
and so does an Azure LLM inference trace (``.csv``, ``bench/trace.load_azure``; exact arrival
times, so ``--arrival-jitter-s 0``).

``DayStudyConfig`` (validated once) -> ``run_study`` -> a report dict -> ``print_study``. The
requests (``bench/replay_planner.day_requests``: the trace repeated over the day, thinned by a
daily cycle), the workers (``bench/replay_fluid.py``: the mock's timing model) and the planner
(``serving/planner/core.py`` over the virtual connector, in virtual time) are the same for each
policy; only the sizing differs:

* ``static``: the replicas the peak five minutes of the day need (the planner's capacity model
  at that rate), all day: what one provisions without a planner;
* ``reactive``: the planner sizing for the load it observes (``lookahead: none``);
* ``lead-time``: the planner sizing for the load it predicts one lead time ahead.

The planner's profile is measured the way ``strata profile --engine mock`` measures it, from a
mock engine of the workers' shape and timing model, so planner and workers disagree only as
much as a real profile and a real engine do.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.replay_fluid import WorkerShape
from bench.replay_planner import (
    DAILY_CURVES,
    DAY_S,
    SimSetup,
    day_requests,
    hindsight_gpu_hours,
    peak_replicas,
    run_planned,
    run_static,
)
from bench.trace import load_trace
from serving.engine.timing import TimingProfile
from serving.planner.capacity import CapacityModel
from serving.planner.config import PlannerConfig, load_config, parse_config
from serving.planner.profile import PerfProfile

Policy = Literal["static", "reactive", "lead-time"]
# SLA attainments this close count as equal (one request in 10,000): near a 100% ceiling the
# planner's and a static pool's attainments differ by single requests, not by a pool size.
SLA_EQUAL_TOLERANCE = 1e-4
POLICIES: tuple[Policy, ...] = ("static", "reactive", "lead-time")


class DayStudyConfig(BaseModel):
    """Everything a study needs; ``extra="forbid"``: a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trace: Path
    policies: tuple[Policy, ...] = POLICIES
    peak_speedup: float = Field(default=4.0, gt=0, description="Trace replayed this much faster.")
    duration_s: float = Field(default=DAY_S, gt=0)
    start_s: float = Field(default=0.0, ge=0, description="Time of day the measurement starts.")
    warmup_s: float = Field(default=1800.0, ge=0, description="Simulated before, not measured.")
    lead_time_s: float = Field(default=180.0, ge=0)
    sla_ttft_s: float = Field(default=2.0, gt=0)
    sla_itl_s: float = Field(default=0.05, gt=0)
    price_usd_per_gpu_hour: float = Field(default=4.0, ge=0)
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=64, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    kv_capacity_tokens: int = Field(default=1024 * 512, ge=1)
    timing_profile: Path | None = None
    static_replicas: int | None = Field(
        default=None, ge=1, description="static: this many replicas, not the peak's figure."
    )
    planner_config: Path | None = Field(
        default=None, description="Planner YAML for the planned policies (roles: both)."
    )
    equal_sla_static: bool = Field(
        default=True,
        description="With static and lead-time: also simulate larger static pools until one "
        "attains lead-time's SLA (the static pool of equal SLA).",
    )
    arrival_jitter_s: float = Field(default=3.0, ge=0)
    daily_curve: Literal["chat", "sine"] = Field(
        default="chat",
        description="The day's shape (bench/replay_planner.py): chat (night trough, morning "
        "ramp, midday plateau, evening peak; mean/peak 0.67) or sine (one-day sinusoid, mean/peak "
        "0.6); both peak/trough 5.",
    )
    seed: int = 0


def simulation(config: DayStudyConfig) -> tuple[SimSetup, PerfProfile]:
    """The day (requests, workers, SLA, lead time) and the planner's profile of the workers."""
    trace = load_trace(config.trace)
    if not trace:
        raise ValueError(f"{config.trace}: no requests")
    timing = (
        TimingProfile.from_json(config.timing_profile) if config.timing_profile else TimingProfile()
    )
    shape = WorkerShape(
        kv_capacity_tokens=config.kv_capacity_tokens,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    setup = SimSetup(
        requests=lambda: day_requests(
            trace, peak_speedup=config.peak_speedup, duration_s=config.warmup_s + config.duration_s,
            start_s=config.start_s - config.warmup_s, seed=config.seed,
            jitter_s=config.arrival_jitter_s, share=DAILY_CURVES[config.daily_curve],
        ),
        duration_s=config.duration_s, warmup_s=config.warmup_s, shape=shape, timing=timing,
        lead_time_s=config.lead_time_s, sla_ttft_s=config.sla_ttft_s, sla_itl_s=config.sla_itl_s,
        price_per_gpu_hour=config.price_usd_per_gpu_hour,
    )  # fmt: skip
    return setup, measure_profile(shape, timing)


def run_study(config: DayStudyConfig, progress=lambda line: None) -> dict[str, Any]:
    """Simulate each policy over the same requests; the report (plain values)."""
    setup, profile = simulation(config)
    planned = {p: planner_config(config, p) for p in config.policies if p != "static"}
    base = next(iter(planned.values()), None) or planner_config(config, "lead-time")
    capacity = CapacityModel(
        profile, base.sla, target_utilization=base.scaling.target_utilization
    )  # fmt: skip
    static_replicas, peak_rate = peak_replicas(setup, capacity, "both")
    static_replicas = min(max(static_replicas, config.min_replicas), config.max_replicas)
    static_replicas = config.static_replicas or static_replicas
    floor_gpu_hours = hindsight_gpu_hours(setup, capacity, "both", config.min_replicas)
    results = []
    for policy in config.policies:
        progress(f"{policy}: simulating {config.duration_s / 3600:.1f} h ...")
        if policy == "static":
            outcome = run_static(setup, {"both": static_replicas})
        else:
            outcome = run_planned(setup, planned[policy], capacity, policy)
        figures = outcome.figures(config.price_usd_per_gpu_hour)
        figures["replica_timeline"] = _hourly(outcome.replicas, config)
        results.append(figures)
        _report_progress(progress, figures)
    if config.equal_sla_static:
        results += equal_sla_statics(setup, config, results, static_replicas, progress)
    return {
        "study": "planner-day",
        "config": config.model_dump(mode="json"),
        "static_replicas": static_replicas,
        "peak_rate_5min": peak_rate,
        "hindsight_gpu_hours": floor_gpu_hours,
        "profile": {"engine": profile.engine, "prefill_points": len(profile.prefill)},
        "results": results,
        "verdict": verdict(results),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 1) for x in os.getloadavg()],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _report_progress(progress, figures: dict[str, Any]) -> None:
    progress(f"{figures['policy']}: SLA {figures['sla_attainment']:.2%}, "
             f"{figures['gpu_hours']:.1f} GPU-hours ({figures['sim_wall_s']:.0f} s, "
             f"CPU {figures['sim_cpu_s']:.0f} s)")  # fmt: skip


def equal_sla_statics(
    setup: SimSetup, config: DayStudyConfig, results: list[dict[str, Any]], size: int, progress
) -> list[dict[str, Any]]:
    """Static pools one replica larger at a time (``static-N``) until one attains lead-time's
    SLA: the static pool of equal SLA. None unless both ``static`` and ``lead-time`` ran."""
    by = {r["policy"]: r for r in results}
    if "static" not in by or "lead-time" not in by:
        return []
    goal, sla, extra = by["lead-time"]["sla_attainment"], by["static"]["sla_attainment"], []
    while sla < goal - SLA_EQUAL_TOLERANCE and size < config.max_replicas:
        size += 1
        progress(f"static-{size}: simulating (the static pool of lead-time's SLA?) ...")
        figures = run_static(setup, {"both": size}, name=f"static-{size}").figures(
            config.price_usd_per_gpu_hour
        )
        figures["replica_timeline"] = [float(size)] * max(1, math.ceil(config.duration_s / 3600))
        _report_progress(progress, figures)
        extra.append(figures)
        sla = figures["sla_attainment"]
    return extra


def planner_config(
    config: DayStudyConfig, policy: Policy, roles: tuple[str, ...] = ("both",)
) -> PlannerConfig:
    """The planner config of a planned policy: the YAML's (if any) with this study's SLA, lead
    time and pool bounds; ``reactive`` sizes for the observed load. ``roles``: ``("both",)``
    (the study's aggregated pool) or ``("prefill", "decode")`` (disaggregated pools, each with
    the study's bounds; ``bench/planner_frontier.py``'s ``-pd`` points)."""
    sla = {"ttft_s": config.sla_ttft_s, "itl_s": config.sla_itl_s}
    lead = {"node_provisioning_s": config.lead_time_s, "weights_s": 0.0, "warmup_s": 0.0,
            "use_measured": False}  # fmt: skip
    role = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "lead_time": lead}  # fmt: skip
    lookahead = "none" if policy == "reactive" else "lead_time"
    overrides = {"sla": sla, "roles": {"both": role}, "scaling.lookahead": lookahead,
                 "prices_usd_per_gpu_hour": {"default": config.price_usd_per_gpu_hour}}  # fmt: skip
    if config.planner_config is not None:
        base = load_config(config.planner_config, {"connector.kind": "virtual"})
        data = base.model_dump(mode="json")
        if roles != ("both",) or set(base.roles) != {"both"}:
            raise ValueError(f"{config.planner_config}: the day study sizes one 'both' pool")
        role = {**data["roles"]["both"], **role}
        data.update(sla=sla, roles={"both": role},
                    prices_usd_per_gpu_hour=overrides["prices_usd_per_gpu_hour"])  # fmt: skip
        data["scaling"]["lookahead"] = lookahead
        return parse_config(data, source=str(config.planner_config))
    data: dict[str, Any] = {
        "model": "day-study",
        "profile": "in-process-mock-profile.json",
        "sla": sla,
        "roles": {name: role for name in roles},
        "scaling": {"lookahead": lookahead},
        "connector": {"kind": "virtual"},
        "prices_usd_per_gpu_hour": overrides["prices_usd_per_gpu_hour"],
    }
    return parse_config(data, source=f"day study ({policy})")


def measure_profile(shape: WorkerShape, timing: TimingProfile) -> PerfProfile:
    """``strata profile --engine mock`` of one worker of ``shape`` (virtual time, seconds)."""
    from serving.engine.core import EngineCore
    from serving.engine.scheduler import SchedulerConfig
    from serving.engine.timing import MockModelRunner
    from serving.planner.profiler import default_plan, profile_engine

    block_size = 16
    core = EngineCore(
        MockModelRunner(vocab_size=32_000, num_blocks=shape.kv_capacity_tokens // block_size,
                        block_size=block_size, profile=timing),
        SchedulerConfig(max_num_seqs=shape.max_num_seqs,
                        max_num_batched_tokens=shape.max_num_batched_tokens,
                        max_model_len=shape.kv_capacity_tokens),
        enable_prefix_caching=False,
        clock=lambda: 0.0,
    )  # fmt: skip
    plan = default_plan(core, wall_clock=False)
    return profile_engine(core, engine="mock", model="day-study", device="virtual",
                          vocab_size=32_000, plan=plan)  # fmt: skip


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal: lead-time >= static on SLA with >= 30% fewer GPU-hours, and more SLA
    than reactive. Only the policies present are compared."""
    by = {r["policy"]: r for r in results}
    out: dict[str, Any] = {}
    lead, static, reactive = by.get("lead-time"), by.get("static"), by.get("reactive")
    if lead and static:
        saved = 1 - lead["gpu_hours"] / static["gpu_hours"]
        out["gpu_hours_saved_vs_static"] = saved
        out["sla_at_least_static"] = (
            lead["sla_attainment"] >= static["sla_attainment"] - SLA_EQUAL_TOLERANCE
        )
        out["saves_30_percent"] = saved >= 0.30
    statics = [r for r in results if r["policy"].startswith("static-")]
    pools = [static, *statics] if static else []
    equal = next((r for r in pools if r["sla_attainment"] >= lead["sla_attainment"]
                  - SLA_EQUAL_TOLERANCE), None) if lead else None  # fmt: skip
    if lead and equal is not None and equal is not static:
        below = pools[pools.index(equal) - 1]
        n = int(equal["policy"].split("-")[1])
        low, high = below["sla_attainment"], equal["sla_attainment"]
        size = min(n - 1 + (lead["sla_attainment"] - low) / (high - low), n) if high > low else n
        out["equal_sla_static_replicas"] = n
        out["gpu_hours_saved_vs_equal_sla_static"] = 1 - lead["gpu_hours"] / equal["gpu_hours"]
        # A static pool's SLA rises in steps: the fractional pool of exactly lead-time's SLA.
        out["equal_sla_static_interpolated_replicas"] = size
        out["gpu_hours_saved_vs_interpolated_static"] = 1 - lead["gpu_hours"] / (
            equal["gpu_hours"] * size / n
        )
    if lead and reactive:
        out["sla_gain_vs_reactive"] = lead["sla_attainment"] - reactive["sla_attainment"]
        out["more_sla_than_reactive"] = lead["sla_attainment"] > reactive["sla_attainment"]
    return out


def _hourly(replicas: list[tuple[float, int]], config: DayStudyConfig) -> list[float]:
    """Mean replicas (serving + starting) per hour of the measured period."""
    hours = max(1, math.ceil(config.duration_s / 3600))
    sums, counts = [0.0] * hours, [0] * hours
    for t, n in replicas:
        i = min(int((t - config.warmup_s) // 3600), hours - 1)
        if i >= 0:
            sums[i] += n
            counts[i] += 1
    last = replicas[0][1] if replicas else 0
    out = []
    for s, c in zip(sums, counts, strict=True):
        last = s / c if c else last
        out.append(round(last, 2))
    return out


def print_study(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = report["config"]
    table = Table(
        title=f"planner day study: {Path(cfg['trace']).name} x{cfg['peak_speedup']:g}, "
        f"{cfg['duration_s'] / 3600:.0f} h ({cfg.get('daily_curve', 'chat')} curve), "
        f"lead time {cfg['lead_time_s']:.0f} s, "
        f"SLA TTFT {cfg['sla_ttft_s']:g} s / ITL {cfg['sla_itl_s'] * 1000:.0f} ms"
    )
    for column in ("policy", "SLA met", "TTFT p50/p99", "ITL p50/p99", "GPU-hours",
                   "replicas min/mean/max", "scale events", "$/M out tok"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in report["results"]:
        rep = r["replicas"]
        table.add_row(
            r["policy"], f"{r['sla_attainment']:.2%}",
            f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} s",
            f"{r['itl_s']['p50'] * 1000:.0f} / {r['itl_s']['p99'] * 1000:.0f} ms",
            f"{r['gpu_hours']:.1f}", f"{rep['min']} / {rep['mean']:.1f} / {rep['max']}",
            str(r["scale_events"]), f"{r['cost_per_million_output_tokens_usd']:.2f}",
        )  # fmt: skip
    console.print(table)
    v = report["verdict"]
    if "gpu_hours_saved_vs_static" in v:
        console.print(
            f"lead-time vs static: {v['gpu_hours_saved_vs_static']:.1%} fewer GPU-hours, SLA "
            f"{'>=' if v['sla_at_least_static'] else '<'} static"
        )
    if "equal_sla_static_replicas" in v:
        console.print(
            f"static pool of lead-time's SLA: {v['equal_sla_static_replicas']} replicas "
            f"({v['equal_sla_static_interpolated_replicas']:.2f} interpolated); lead-time uses "
            f"{v['gpu_hours_saved_vs_equal_sla_static']:.1%} "
            f"({v['gpu_hours_saved_vs_interpolated_static']:.1%}) fewer GPU-hours"
        )
    if "hindsight_gpu_hours" in report:
        console.print(
            f"each 5 minutes sized for its own load at the capacity model's figure, with "
            f"hindsight: {report['hindsight_gpu_hours']:.1f} GPU-hours (not simulated; the SLA "
            f"such a pool attains: bench/planner_frontier.py hindsight:300:1.0)"
        )
    if "sla_gain_vs_reactive" in v:
        console.print(f"lead-time vs reactive: SLA {v['sla_gain_vs_reactive'] * 100:+.2f} points")
