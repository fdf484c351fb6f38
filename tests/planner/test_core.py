"""The planner core with an injected clock: hysteresis, budgets, minimums, missing metrics,
lead time, the fast loop and the correction factor."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from serving.planner.core import tick
from serving.planner.profile import PerfProfile
from tests.planner.conftest import make_planner, observe, traffic


class FakeClock:
    """The planner's only notion of time: advanced by the test, never read from the system."""

    def __init__(self, start_s: float = 1_000.0) -> None:
        self.now_s = start_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s


def run(state, clock, replicas, loads, **kwargs):  # type: ignore[no-untyped-def]
    """Tick once per load value, 10 s apart, applying each decision at once (an ideal
    connector). Returns the decisions."""
    decisions = []
    for load in loads:
        decision = tick(observe(clock.advance(10), replicas, load, **kwargs), state)
        replicas = {role: d.target for role, d in decision.roles.items()}
        decisions.append(decision)
    return decisions


def test_zero_traffic_keeps_the_minimum(profile: PerfProfile) -> None:
    state = make_planner(profile, roles={"both": {"min_replicas": 2, "max_replicas": 10}})
    clock = FakeClock()
    decisions = run(state, clock, {"both": 6}, [traffic(0.0)] * 120)  # 20 minutes idle
    targets = [d.roles["both"].target for d in decisions]
    assert min(targets) == 2 and targets[-1] == 2
    # Down one replica per tick, and only after the 300 s stabilisation window.
    assert targets[:29] == [6] * 29
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(targets))
    # Starting at the minimum with no traffic, nothing ever moves.
    decisions = run(state, clock, {"both": 2}, [traffic(0.0)] * 30)
    assert {d.roles["both"].target for d in decisions} == {2}
    assert "(min)" in decisions[-1].roles["both"].reason


def test_broken_metrics_hold_the_current_size_and_say_so(profile: PerfProfile) -> None:
    state = make_planner(profile, roles={"both": {"min_replicas": 1, "max_replicas": 10}})
    clock = FakeClock()
    # Busy, then the source breaks: no scale-down although the last load was low.
    run(state, clock, {"both": 4}, [traffic(20.0)] * 3)
    error = "GET http://frontend:8000/metrics: connection refused"
    decisions = run(state, clock, {"both": 7}, [None] * 60, error=error)
    for decision in decisions:
        assert decision.holding
        assert decision.roles["both"].target == 7
        assert decision.roles["both"].reason == (
            f"metrics unavailable ({error}): holding 7 replica(s)"
        )
    # Below the minimum it still brings the role up to the minimum.
    state = make_planner(profile, roles={"both": {"min_replicas": 2, "max_replicas": 10}})
    (decision,) = run(state, FakeClock(), {"both": 0}, [None], error="timeout")
    assert decision.roles["both"].target == 2


def test_noisy_load_does_not_flap(profile: PerfProfile) -> None:
    """Bursty noise (20% per sample) around a load between two sizes: after the first ramp
    the size changes at most twice in an hour (one excursion), each size held for at least the
    300 s stabilisation window, instead of following the samples."""
    state = make_planner(
        profile, predictor={"kind": "holt"}, scaling={"interval_s": 10, "model_interval_s": 60}
    )
    per_replica = state.capacity.per_replica("both", 1000, 200).request_rate
    mean_rate = 3.5 * per_replica  # needs 4 replicas; the noise often says 3 or 5
    rng = np.random.default_rng(7)
    loads = [traffic(mean_rate * max(rng.normal(1.0, 0.2), 0.0)) for _ in range(360)]
    decisions = run(state, FakeClock(), {"both": 1}, loads)
    targets = [d.roles["both"].target for d in decisions]
    naive = [state.capacity.replicas_needed("both", t.request_rate, 1000, 200) for t in loads]
    naive_changes = sum(a != b for a, b in itertools.pairwise(naive))
    changes = [i for i in range(1, len(targets)) if targets[i] != targets[i - 1]]
    after_ramp = [i for i in changes if i > 1]
    assert naive_changes > 50, "the noise must cross replica boundaries for this test to mean much"
    assert len(after_ramp) <= 2, f"flapped at ticks {after_ramp}: {targets}"
    assert all(b - a >= 30 for a, b in itertools.pairwise(after_ramp)), after_ramp
    assert max(targets) <= 6 and targets[-1] >= 4


def test_gpu_budget_is_respected(profile: PerfProfile) -> None:
    state = make_planner(
        profile,
        roles={
            "prefill": {"min_replicas": 1, "max_replicas": 10},
            "decode": {"min_replicas": 1, "max_replicas": 10, "gpus_per_replica": 2},
        },
        max_total_gpus=9,
    )
    clock = FakeClock()
    replicas = {"prefill": 1, "decode": 1}
    for rate in [1, 5, 20, 60, 200, 60, 5]:
        for _ in range(3):
            decision = tick(observe(clock.advance(10), replicas, traffic(rate, 4000, 500)), state)
            replicas = {role: d.target for role, d in decision.roles.items()}
            assert replicas["prefill"] + 2 * replicas["decode"] <= 9
            assert replicas["prefill"] >= 1 and replicas["decode"] >= 1
    peak = tick(observe(clock.advance(10), replicas, traffic(200, 4000, 500)), state)
    assert "GPU budget 9" in peak.roles["decode"].reason
    # A per-role budget caps that role alone.
    state = make_planner(
        profile, roles={"both": {"min_replicas": 1, "max_replicas": 10, "max_gpus": 3}}
    )
    (decision,) = run(state, FakeClock(), {"both": 1}, [traffic(500)])
    assert decision.roles["both"].target == 3


def test_scale_up_is_immediate_but_bounded_per_tick(profile: PerfProfile) -> None:
    state = make_planner(profile, scaling={"max_step_up": 2})
    decisions = run(state, FakeClock(), {"both": 1}, [traffic(1.0), traffic(80.0), traffic(80.0),
                                                       traffic(80.0), traffic(80.0)])  # fmt: skip
    targets = [d.roles["both"].target for d in decisions]
    assert state.capacity.replicas_needed("both", 80.0, 1000, 200) == 6
    assert targets == [1, 3, 5, 6, 6]
    assert "step limit" in decisions[1].roles["both"].reason


def test_lead_time_aware_planner_scales_before_the_ramp_arrives(profile: PerfProfile) -> None:
    """A steady ramp: the planner that looks ahead by its lead time orders replicas for the
    load of ``lead time`` later; the reactive one sizes for now."""
    lead_time = {"node_provisioning_s": 120, "weights_s": 50, "warmup_s": 10}
    roles = {"both": {"min_replicas": 1, "max_replicas": 40, "lead_time": lead_time}}
    predictor = {"kind": "holt", "bucket_s": 60, "window_s": 1800}
    ahead = make_planner(profile, roles=roles, predictor=predictor, scaling={"tolerance": 0})
    reactive = make_planner(profile, roles=roles, predictor=predictor,
                            scaling={"lookahead": "none", "tolerance": 0})  # fmt: skip
    per_replica = ahead.capacity.per_replica("both", 1000, 200).request_rate

    def rate(tick: int) -> float:  # one more replica's worth of load every 100 s
        return per_replica * (0.5 + tick / 10)

    ramp = [traffic(rate(i)) for i in range(120)]
    got_ahead = run(ahead, FakeClock(), {"both": 1}, ramp)[-1]
    got_reactive = run(reactive, FakeClock(), {"both": 1}, ramp)[-1]
    assert got_ahead.roles["both"].lead_time_s == 180
    now = reactive.capacity.replicas_needed("both", rate(119), 1000, 200)
    later = ahead.capacity.replicas_needed("both", rate(119 + 18), 1000, 200)
    assert got_reactive.roles["both"].target <= now < later <= got_ahead.roles["both"].target
    assert "peak of holt over the next 190 s" in got_ahead.roles["both"].reason


def test_measured_lead_times_replace_the_estimate(profile: PerfProfile) -> None:
    state = make_planner(profile)
    assert state.lead_time_s["both"] == 170  # 90 + 60 + 20, the defaults
    run(state, FakeClock(), {"both": 2}, [traffic(1.0)], lead_times={"both": (40.0, 60.0)})
    assert state.lead_time_s["both"] == 50


def test_fast_loop_adds_a_replica_while_the_queue_stays_long(profile: PerfProfile) -> None:
    state = make_planner(profile, scaling={"queue_per_replica_up": 4, "queue_ticks_up": 2})
    clock = FakeClock()
    first = run(state, clock, {"both": 2}, [traffic(1.0)] * 3)[-1].roles["both"].target
    queued = run(state, clock, {"both": 2}, [traffic(1.0)] * 2, waiting={"both": 20})
    assert [d.roles["both"].target for d in queued] == [first, first + 1]
    assert f"{first + 1} for queueing" in queued[-1].roles["both"].reason
    # The floor goes at the first slow loop after which nothing queued (then the window holds).
    calm = run(state, clock, {"both": first + 1}, [traffic(1.0)] * 2)
    assert "queueing" in calm[0].roles["both"].reason
    assert "queueing" not in calm[1].roles["both"].reason


def test_slow_observed_ttft_raises_the_correction_and_the_size(profile: PerfProfile) -> None:
    state = make_planner(profile, scaling={"correction_smoothing": 1.0})
    clock = FakeClock()
    base = run(state, clock, {"both": 1}, [traffic(40.0)] * 2)[-1].roles["both"].target
    assert base == state.capacity.replicas_needed("both", 40.0, 1000, 200) == 3
    expected = state.capacity.expected_ttft_s("both", 40.0 / base, 1000, 200)
    slow = replace(traffic(40.0), ttft_mean_s=2.5 * expected)
    decision = run(state, clock, {"both": base}, [slow])[-1]
    assert decision.corrections["ttft"] == pytest.approx(2.5)
    corrected = state.capacity.replicas_needed("both", 2.5 * 40.0, 1000, 200)
    assert corrected == 8
    assert decision.roles["both"].target == min(corrected, base + 4)  # max_step_up 4
    assert "x2.50 / 14.23 per replica (utilization) -> 8" in decision.roles["both"].reason


def test_a_latency_correction_costs_nothing_while_latencies_stay_inside_the_sla(
    profile: PerfProfile,
) -> None:
    """``correction_applies_to: latency``: observed TTFT 1.2x the model's, with the model's
    TTFT far inside the 2 s SLA at the utilization cap, leaves the size as it was (the capacity
    mode divides the capacity by 1.2); 5x (an ITL the SLA no longer holds at the cap) lowers
    a replica's capacity to the rate the corrected latencies allow."""
    sizes = {}
    for mode in ("capacity", "latency"):
        state = make_planner(profile, scaling={"correction_smoothing": 1.0,
                                               "correction_applies_to": mode})  # fmt: skip
        clock = FakeClock()
        base = run(state, clock, {"both": 1}, [traffic(40.0)] * 2)[-1].roles["both"].target
        expected = state.capacity.expected_ttft_s("both", 40.0 / base, 1000, 200)
        slow = replace(traffic(40.0), ttft_mean_s=1.2 * expected)
        decision = run(state, clock, {"both": base}, [slow])[-1]
        assert decision.corrections["ttft"] == pytest.approx(1.2)
        sizes[mode] = (base, decision.roles["both"].target, decision.roles["both"].reason)
    capacity_base, capacity_target, capacity_reason = sizes["capacity"]
    assert "x1.20 / 14.23 per replica (utilization) -> 4" in capacity_reason
    latency_base, latency_target, reason = sizes["latency"]
    assert latency_base == capacity_base == 3
    assert capacity_target == state.capacity.replicas_needed("both", 1.2 * 40.0, 1000, 200) == 4
    assert latency_target == 3
    assert "/ 14.23 per replica (latencies x1.20) (utilization) -> 3" in reason
    # A correction that puts the model's ITL over the SLA at the cap lowers the capacity.
    profile_sla_itl_s = state.config.sla.itl_s
    corrected = state.capacity.per_replica_corrected("both", 1000, 200, 5.0)
    assert corrected.limit == "itl" and corrected.request_rate < 10.0
    assert corrected.itl_s <= profile_sla_itl_s / 5.0
    assert state.capacity.per_replica_corrected("both", 1000, 200, 1.0) == (
        state.capacity.per_replica("both", 1000, 200)
    )


def test_holt_sizes_for_an_upper_quantile_of_its_forecast() -> None:
    from serving.planner.config import PredictorConfig
    from serving.planner.predictors import make_predictor

    predictor = make_predictor(PredictorConfig(kind="holt", bucket_s=60, window_s=1800))
    rng = np.random.default_rng(3)
    for i in range(180):  # 30 minutes of a slow ramp with noise, every 10 s
        predictor.observe(i * 10.0, 10 + 0.002 * i * 10 + rng.normal(0, 1))
    point = predictor.forecast(1800.0, [60.0, 600.0])
    upper = predictor.forecast(1800.0, [60.0, 600.0], quantile=0.8)
    # Never narrower further out (as wide when the fit smooths the level almost flat, as here).
    assert upper[1] - point[1] >= upper[0] - point[0] - 1e-9 > 0
    assert point[1] > point[0] > 10  # it follows the ramp


def test_scale_down_tolerance_widens_the_band_down_only(profile: PerfProfile) -> None:
    """A load 20% below the current size: the default band (10%) lets the pool go down, a
    30% down-only band holds it; the way up is unchanged."""
    probe = make_planner(profile, predictor={"kind": "constant"})
    per_replica = probe.capacity.per_replica("both", 1000, 200).request_rate
    low = [traffic(per_replica * 8 * 0.8)] * 60  # ten minutes at 6.4 replicas' load
    for band, floor in ((None, 7), (0.3, 8)):
        state = make_planner(profile, predictor={"kind": "constant"},
                             scaling={"scale_down_tolerance": band})  # fmt: skip
        decisions = run(state, FakeClock(), {"both": 8}, low)
        assert decisions[-1].roles["both"].target == floor
        (up,) = run(state, FakeClock(5_000.0), {"both": 8}, [traffic(per_replica * 9.5)])
        assert up.roles["both"].target == 10  # 9.5 replicas' load: up at once either way


def test_sqrt_headroom_adds_a_square_root_margin(profile: PerfProfile) -> None:
    """Square-root staffing: a load of ``a`` replicas makes the pool grow to ``ceil(a + beta *
    sqrt(a))``, a margin relatively larger on a small pool (4 -> 6, +50%) than on a large one
    (36 -> 42, +17%); without it (the default) the pool is the load rounded up. The bands
    compare the load with the current size: a pool that covers its load keeps its size."""
    probe = make_planner(profile)
    per_replica = probe.capacity.per_replica("both", 1000, 200).request_rate
    roles = {"both": {"min_replicas": 1, "max_replicas": 64}}
    for beta, expected in ((0.0, {4: 4, 36: 36}), (1.0, {4: 6, 36: 42})):
        for load, size in expected.items():
            scaling = {"sqrt_headroom": beta, "max_step_up": 64}
            state = make_planner(profile, roles=roles, scaling=scaling)
            steady = [traffic(per_replica * load * 0.999)] * 12  # two minutes, a hair under
            decisions = run(state, FakeClock(), {"both": 1}, steady)
            assert [d.roles["both"].target for d in decisions] == [size] * 12, (beta, load)
            assert ("+ 1 sqrt" in decisions[-1].roles["both"].reason) == (beta > 0)
    state = make_planner(profile, roles=roles, scaling={"sqrt_headroom": 1.0})
    (held,) = run(state, FakeClock(), {"both": 5}, [traffic(per_replica * 4 * 0.999)])
    assert held.roles["both"].target == 5  # 4 replicas' load fits 5: no margin added
