"""The planner in the offline simulator: a day of traffic in virtual time, sized three ways, and
a pool sized with hindsight as the reference. Driven by ``bench/planner_day.py`` (``strata
bench replay --planner``) and ``bench/planner_frontier.py``; the trace is a required argument
there (Mooncake's conversation trace: see ``bench/planner_day.py``).

The day: the trace's own arrivals, replayed ``peak_speedup`` times faster and repeated to fill
24 hours, each request kept with the probability of the hour's share of the peak (a daily
curve, ``DAILY_CURVES``): the daily cycle on top of the trace's minute-scale burstiness. Workers are
``bench/replay_fluid.py``'s (the mock's H100 timing model); a scale-up serves one lead time
after it is ordered and is paid for from that moment; a scale-down drains.

Runs on the same requests:

* ``run_static``: a fixed pool (the day study's ``static``: as many replicas as the peak five
  minutes need by the planner's capacity model, or a given size);
* ``run_planned``: the planner's core over the virtual connector (``reactive``: ``lookahead:
  none``; ``lead-time``: the peak it predicts until a replica ordered now would serve);
* ``run_hindsight``: every window sized for its own arrivals, known in advance (no policy can
  do that: the reference for what following the load costs and attains).

Figures: SLA attainment (requests with TTFT <= the SLA and mean ITL <= the SLA), TTFT and ITL
percentiles, GPU-hours, cost and cost per million output tokens. No I/O besides the report.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.replay_fluid import FluidCluster, SimRequest, StepCost, WorkerShape
from bench.trace import TraceRequest
from serving.engine.timing import TimingProfile
from serving.planner.capacity import CapacityModel
from serving.planner.config import PlannerConfig, Role
from serving.planner.connectors.virtual import VirtualConnector
from serving.planner.core import PlannerState, make_state, tick
from serving.planner.predictors import Predictor
from serving.planner.sizing import replicas_for
from serving.planner.types import Observation, RoleObservation, Traffic

DAY_S = 86_400.0
# Share of the peak rate at each hour 0..24 (linear in between): low at night, a morning ramp,
# a midday plateau and an evening peak, as chat services see. Peak/trough = 5.
DIURNAL = (0.30, 0.25, 0.21, 0.20, 0.20, 0.24, 0.33, 0.48, 0.66, 0.82, 0.92, 0.97, 0.95,
           0.90, 0.92, 0.95, 0.92, 0.88, 0.88, 0.94, 1.00, 0.90, 0.68, 0.47, 0.30)  # fmt: skip


def diurnal_share(time_s: float) -> float:
    """``chat``: the share of the peak rate at ``time_s`` on ``DIURNAL`` (mean/peak 0.67)."""
    hour = (time_s % DAY_S) / 3600.0
    low = int(hour)
    return DIURNAL[low] + (DIURNAL[low + 1] - DIURNAL[low]) * (hour - low)


SINE_TROUGH_SHARE = 0.2  # the same peak/trough (5) as ``DIURNAL``
SINE_TROUGH_HOUR = 4.0


def sine_share(time_s: float) -> float:
    """``sine``: a sinusoid with a one-day period between ``SINE_TROUGH_SHARE`` (at 04:00) and
    1.0 (at 16:00), mean/peak 0.6: the shape of Dynamo's planner benchmarks
    (``benchmarks/sin_load_generator``), stretched to a day."""
    hour = (time_s % DAY_S) / 3600.0
    swing = (1.0 - SINE_TROUGH_SHARE) / 2
    return 1.0 - swing - swing * math.cos(2 * math.pi * (hour - SINE_TROUGH_HOUR) / 24.0)


DAILY_CURVES: dict[str, Callable[[float], float]] = {"chat": diurnal_share, "sine": sine_share}


def day_requests(
    trace: Sequence[TraceRequest],
    *,
    peak_speedup: float,
    duration_s: float = DAY_S,
    start_s: float = 0.0,
    seed: int = 0,
    jitter_s: float = 3.0,
    share: Callable[[float], float] = diurnal_share,
) -> Iterator[SimRequest]:
    """The trace, ``peak_speedup`` times faster, repeated over ``[start_s, start_s +
    duration_s)``, thinned by ``share`` (a ``DAILY_CURVES`` entry); arrivals spread over
    ``jitter_s`` (trace seconds; the Mooncake trace buckets them every ~3 s). Deterministic in
    ``seed``."""
    rng = np.random.default_rng(seed)
    span_s = (trace[-1].arrival_s - trace[0].arrival_s + jitter_s) / peak_speedup
    base = trace[0].arrival_s
    offsets = [(r.arrival_s - base + rng.random() * jitter_s) / peak_speedup for r in trace]
    order = sorted(range(len(trace)), key=offsets.__getitem__)
    index = 0
    cycle = math.floor(start_s / span_s)
    while True:
        cycle_start = cycle * span_s
        keep = rng.random(len(order))
        for position in order:
            arrival = cycle_start + offsets[position]
            if arrival < start_s or keep[position] >= share(arrival):
                continue
            if arrival >= start_s + duration_s:
                return
            r = trace[position]
            yield SimRequest(index, arrival - start_s, r.input_length, r.output_length)
            index += 1
        cycle += 1


@dataclass
class Outcome:
    """What a day under one policy measured (plain values)."""

    policy: str
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    met_sla: int = 0
    hourly: dict[int, list[int]] = field(default_factory=dict)  # hour -> [requests, met]
    gpu_s: float = 0.0
    replicas: list[tuple[float, int]] = field(default_factory=list)  # (time, serving+starting)
    scale_events: int = 0
    rejected: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def figures(self, price_per_gpu_hour: float) -> dict[str, Any]:
        n = len(self.ttft_s)
        ttft, itl = np.asarray(self.ttft_s), np.asarray(self.itl_s)
        gpu_hours = self.gpu_s / 3600.0
        cost = gpu_hours * price_per_gpu_hour
        sizes = [count for _, count in self.replicas]
        return {
            "policy": self.policy,
            "requests": n,
            "rejected": self.rejected,
            "sla_attainment": self.met_sla / n if n else 0.0,
            "hourly_sla_attainment": [
                round(met / count, 4) for _, (count, met) in sorted(self.hourly.items())
            ],
            "ttft_s": {f"p{q}": float(np.percentile(ttft, q)) for q in (50, 90, 99)},
            "itl_s": {f"p{q}": float(np.percentile(itl, q)) for q in (50, 90, 99)},
            "gpu_hours": gpu_hours,
            "cost_usd": cost,
            "cost_per_million_output_tokens_usd": cost / self.output_tokens * 1e6,
            "output_tokens": self.output_tokens,
            "replicas": {"min": min(sizes), "max": max(sizes), "mean": float(np.mean(sizes))},
            "scale_events": self.scale_events,
            "sim_wall_s": self.wall_s,
            "sim_cpu_s": self.cpu_s,
        }


class WindowStats:
    """The last ``window_s`` as the frontend's metrics show it: the planner's metrics source in
    the sim. The request rate counts arrivals (the real source: finished requests plus the
    growth of those in flight); lengths and latencies come from the finished requests."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.arrivals: deque[float] = deque()
        self.done: deque[tuple[float, int, int, float, float]] = deque()

    def arrive(self, r: SimRequest) -> None:
        self.arrivals.append(r.arrival_s)

    def add(self, r: SimRequest) -> None:
        self.done.append((r.finish_s, r.input_tokens, r.output_tokens, r.ttft_s, r.itl_s))

    def traffic(self, now_s: float) -> Traffic:
        done, arrivals = self.done, self.arrivals
        while done and done[0][0] < now_s - self.window_s:
            done.popleft()
        while arrivals and arrivals[0] < now_s - self.window_s:
            arrivals.popleft()
        rate = len(arrivals) / self.window_s
        n = len(done)
        if not n:
            return Traffic(self.window_s, rate, 0.0)
        rows = np.asarray(done)
        return Traffic(
            window_s=self.window_s,
            request_rate=rate,
            num_requests=float(n),
            input_tokens=float(rows[:, 1].mean()),
            output_tokens=float(rows[:, 2].mean()),
            output_tokens_rate=float(rows[:, 2].sum()) / self.window_s,
            ttft_mean_s=float(rows[:, 3].mean()),
            ttft_p90_s=float(np.percentile(rows[:, 3], 90)),
            itl_mean_s=float(rows[:, 4].mean()),
            itl_p90_s=float(np.percentile(rows[:, 4], 90)),
        )


@dataclass(frozen=True)
class SimSetup:
    """Everything but the policy: the same for each policy of a study."""

    requests: Callable[[], Iterator[SimRequest]]  # arrivals over [0, warmup_s + duration_s)
    duration_s: float  # what is measured, after the warm-up
    shape: WorkerShape
    timing: TimingProfile
    lead_time_s: float
    sla_ttft_s: float
    sla_itl_s: float
    price_per_gpu_hour: float
    gpus_per_replica: int = 1
    kv_bandwidth_gbps: float = 25.0
    warmup_s: float = 0.0  # simulated, not measured: queues and predictors settle

    @property
    def end_s(self) -> float:
        return self.warmup_s + self.duration_s


def run_static(
    setup: SimSetup,
    replicas: dict[Role, int],
    name: str = "static",
    on_done: Callable[[SimRequest], None] | None = None,
) -> Outcome:
    """A fixed pool for the whole run (no planner); ``on_done`` sees every finished request
    (the warm-up's too)."""
    outcome = Outcome(name)
    cluster = _cluster(setup, outcome, on_done)
    for role, count in replicas.items():
        for _ in range(count):
            cluster.provision(role, lead_time_s=0.0)
    outcome.replicas.append((setup.warmup_s, sum(replicas.values())))
    return _finish(setup, cluster, outcome)


def run_planned(
    setup: SimSetup,
    config: PlannerConfig,
    capacity: CapacityModel,
    name: str,
    rate_predictor: Predictor | None = None,
) -> Outcome:
    """The planner ticking in virtual time over the virtual connector; ``rate_predictor``
    replaces the configured one (``PerfectForecast``: what a perfect prediction is worth)."""
    outcome = Outcome(name)
    window = WindowStats(config.metrics.window_s)
    cluster = _cluster(setup, outcome, window.add, window.arrive)
    roles = tuple(config.roles)
    connector = VirtualConnector(cluster, roles)
    state = make_state(config, capacity, {r: setup.lead_time_s for r in roles})
    if rate_predictor is not None:
        state.rate = rate_predictor
    for role, role_cfg in config.roles.items():
        for _ in range(role_cfg.min_replicas):
            cluster.provision(role, lead_time_s=0.0)
    interval = config.scaling.interval_s

    def on_tick() -> None:
        now = cluster.now
        counts = connector.replica_counts()
        observation = Observation(
            now, {role: _role_observation(cluster, role, counts[role]) for role in roles},
            window.traffic(now),
        )  # fmt: skip
        decision = tick(observation, state)
        for role, role_decision in decision.roles.items():
            if role_decision.target != role_decision.current:
                outcome.scale_events += 1
                connector.set_replicas(role, role_decision.target)
        if now >= setup.warmup_s:
            total = sum(c.current for c in connector.replica_counts().values())
            outcome.replicas.append((now, total))
        if now + interval < setup.end_s:
            cluster.schedule(now + interval, on_tick)

    cluster.schedule(interval, on_tick)
    return _finish(setup, cluster, outcome, state)


class PerfectForecast(Predictor):
    """The request rate the day will bring, read off its arrivals: at ``t + h``, the arrivals
    of the ``window_s`` before it over ``window_s`` (what the metrics will show then). No
    planner has this; with it, the planner's other losses stand alone. The quantile is
    ignored: there is no uncertainty."""

    name = "perfect"

    def __init__(self, arrivals_s: Sequence[float], window_s: float = 60.0) -> None:
        self.arrivals_s = sorted(arrivals_s)
        self.window_s = window_s

    def observe(self, time_s: float, value: float) -> None:
        pass

    def forecast(
        self, time_s: float, horizons_s: Sequence[float], quantile: float | None = None
    ) -> list[float]:
        rates = []
        for horizon_s in horizons_s:
            end = time_s + horizon_s
            count = bisect.bisect_left(self.arrivals_s, end) - bisect.bisect_left(
                self.arrivals_s, end - self.window_s
            )
            rates.append(count / self.window_s)
        return rates


def _role_observation(cluster: FluidCluster, role: Role, counts: Any) -> RoleObservation:
    workers = [w for w in cluster.workers.values() if w.role == role and w.state == "ready"]
    return RoleObservation(
        ready=counts.ready,
        starting=counts.starting,
        draining=counts.draining,
        num_waiting=float(sum(w.num_waiting for w in workers)),
        num_running=float(sum(len(w.decoding) for w in workers)),
        lead_times_s=counts.lead_times_s,
    )


def _cluster(
    setup: SimSetup,
    outcome: Outcome,
    on_done: Callable[[SimRequest], None] | None = None,
    on_arrival: Callable[[SimRequest], None] = lambda r: None,
) -> FluidCluster:
    def on_finish(r: SimRequest) -> None:
        if on_done is not None:
            on_done(r)
        if r.arrival_s < setup.warmup_s:
            return
        ttft, itl = r.ttft_s, r.itl_s
        outcome.ttft_s.append(ttft)
        outcome.itl_s.append(itl)
        outcome.output_tokens += r.output_tokens
        met = ttft <= setup.sla_ttft_s and itl <= setup.sla_itl_s
        outcome.met_sla += met
        hour = outcome.hourly.setdefault(int((r.arrival_s - setup.warmup_s) // 3600), [0, 0])
        hour[0] += 1
        hour[1] += met

    from bench.replay_timing import ScalarTimingProfile  # the mock's polynomials, fast

    return FluidCluster(
        StepCost(ScalarTimingProfile.of(setup.timing), setup.shape),
        lead_time_s=setup.lead_time_s,
        kv_bandwidth_gbps=setup.kv_bandwidth_gbps,
        on_finish=on_finish,
        on_arrival=on_arrival,
    )


def _finish(
    setup: SimSetup, cluster: FluidCluster, outcome: Outcome, state: PlannerState | None = None
) -> Outcome:
    started, cpu_started = time.perf_counter(), time.process_time()
    cluster.feed(setup.requests())
    cluster.run()
    for worker in [*cluster.retired, *cluster.workers.values()]:
        removed = worker.removed_s if worker.removed_s is not None else setup.end_s
        paid_s = min(removed, setup.end_s) - max(worker.created_s, setup.warmup_s)
        outcome.gpu_s += max(paid_s, 0.0) * setup.gpus_per_replica
    outcome.rejected = cluster.num_rejected
    outcome.wall_s = time.perf_counter() - started
    outcome.cpu_s = time.process_time() - cpu_started
    return outcome


def peak_replicas(
    setup: SimSetup, capacity: CapacityModel, role: Role, window_s: float = 300.0
) -> tuple[int, float]:
    """Replicas the peak ``window_s`` of the day needs, by the capacity model; and that rate."""
    arrivals, isl, osl = [], 0.0, 0.0
    for r in setup.requests():
        if r.arrival_s < setup.warmup_s:
            continue
        arrivals.append(r.arrival_s)
        isl += r.input_tokens
        osl += r.output_tokens
    n = len(arrivals)
    peak = (
        max(bisect.bisect_left(arrivals, t + window_s) - i for i, t in enumerate(arrivals))
        / window_s
    )
    return capacity.replicas_needed(role, peak, isl / n, osl / n), peak


def hindsight_sizes(
    setup: SimSetup,
    capacity: CapacityModel,
    role: Role,
    min_replicas: int,
    window_s: float = 300.0,
    headroom: float = 1.0,
    sqrt_headroom: float = 0.0,
) -> list[int]:
    """Replicas for each ``window_s`` of ``[0, end_s)``, sized with hindsight by the capacity
    model for that window's own arrivals (rate and mean lengths): ``ceil(headroom * a +
    sqrt_headroom * sqrt(a))`` for a load of ``a`` replicas (``planner.sizing.replicas_for``:
    a multiplicative margin, a square-root one, or both)."""
    num_windows = math.ceil(setup.end_s / window_s)
    counts = [0] * num_windows
    tokens = [[0.0, 0.0] for _ in range(num_windows)]
    for r in setup.requests():
        w = min(int(r.arrival_s // window_s), num_windows - 1)
        counts[w] += 1
        tokens[w][0] += r.input_tokens
        tokens[w][1] += r.output_tokens
    sizes = []
    for n, (isl, osl) in zip(counts, tokens, strict=True):
        load = n / window_s / capacity.per_replica(role, isl / n, osl / n).request_rate if n else 0
        sizes.append(max(replicas_for(load, headroom, sqrt_headroom), min_replicas))
    return sizes


def hindsight_gpu_hours(
    setup: SimSetup, capacity: CapacityModel, role: Role, min_replicas: int, window_s: float = 300.0
) -> float:
    """GPU-hours of the measured period under ``hindsight_sizes`` (no lead time, no drains):
    what following the day perfectly by the capacity model would cost. Not simulated; see
    ``run_hindsight`` for the SLA such a pool attains."""
    sizes = hindsight_sizes(setup, capacity, role, min_replicas, window_s)
    first = int(setup.warmup_s // window_s)
    replica_s = 0.0
    for i, n in enumerate(sizes[first:], start=first):
        start, end = max(i * window_s, setup.warmup_s), min((i + 1) * window_s, setup.end_s)
        replica_s += n * max(end - start, 0.0)
    return replica_s * setup.gpus_per_replica / 3600.0


def run_hindsight(
    setup: SimSetup, sizes: Sequence[int], window_s: float, role: Role, name: str = "hindsight"
) -> Outcome:
    """A pool that knows the day in advance: at the start of window ``i`` it has ``sizes[i]``
    replicas serving (ordered ``setup.lead_time_s`` ahead, so they serve on time; drains on the
    way down, paid until their streams finish). No planner can do this: it is the reference for
    what following the load perfectly costs and attains."""
    return run_hindsight_roles(setup, {role: sizes}, window_s, name)


def run_hindsight_roles(
    setup: SimSetup, sizes: dict[Role, Sequence[int]], window_s: float, name: str = "hindsight"
) -> Outcome:
    """``run_hindsight`` for several pools at once (a prefill and a decode pool: each role's
    window ``i`` has ``sizes[role][i]`` replicas serving)."""
    outcome = Outcome(name)
    cluster = _cluster(setup, outcome)
    lead_s = setup.lead_time_s
    num_windows = min(len(s) for s in sizes.values())

    def resize(i: int) -> None:
        now, changed, total = cluster.now, False, 0
        for role, role_sizes in sizes.items():
            wanted = role_sizes[i]
            counts = cluster.counts(role)
            for _ in range(wanted - counts.current):
                worker = cluster.provision(role, lead_time_s=0.0)
                worker.created_s = now - lead_s  # ordered one lead time ago: paid from then
            for _ in range(counts.ready - wanted):  # nothing starts: replicas serve when ordered
                cluster.drain_one(role)
            changed |= wanted != counts.current
            total += wanted
        if now >= setup.warmup_s:
            outcome.replicas.append((now, total))
            outcome.scale_events += changed
        if i + 1 < num_windows:
            cluster.schedule((i + 1) * window_s, lambda: resize(i + 1))

    resize(0)
    return _finish(setup, cluster, outcome)
