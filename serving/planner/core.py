"""The planner core: ``tick(observation, state) -> Decision``. No I/O, no clock, no threads:
time comes in the observation, so tests drive it with an injected clock and the offline
simulator with virtual time.

NOTE: one tick.

1. Metrics missing (``traffic is None``): every role holds its current size (never below its
   minimum) and the reason says why. Nothing else changes.
2. Feed the predictors (request rate; mean prompt and output length) and, with enough requests
   in the window and no role queueing (a short pool's latencies measure the shortage, not the
   model's error), the correction factors: observed TTFT / ITL over what the capacity model
   expects at this load (as Dynamo's planner does), smoothed slowly (a calibration of the
   profile, not a signal that follows the load) and clamped to [0.5, 3].
3. Slow loop, every ``model_interval_s``: per role, the peak predicted rate until a replica
   ordered now would serve and the next re-size (``lookahead: lead_time``; the upper
   ``predictor.quantile`` of the prediction, whose interval widens with the lead time; ``none``
   sizes for the observed rate: a reactive planner), times the correction, over one replica's
   capacity (``capacity.py``): a load of ``a`` replicas gets ``ceil(a + sqrt_headroom *
   sqrt(a))`` (``sizing.py``), unless the current size is within the ``tolerance`` bands
   around ``a`` (then it stays: the margin is added when the pool grows and kept until the load
   falls below the down band); clamped to ``[min_replicas, max_replicas]`` and the role's GPU
   budget.
4. Fast loop, every tick: a role whose workers queue more than ``queue_per_replica_up``
   requests per replica for ``queue_ticks_up`` ticks gets one replica more than it has (while
   none of its replicas is starting), whatever the model says; that floor is dropped at the
   first slow loop after which no worker of the role queued.
5. The total GPU budget, shared in proportion to what each role wants above its minimum.
6. Hysteresis: up at once (at most ``max_step_up``); down only to the highest target of the
   last ``scale_down_stabilization_s`` (looking ahead, never less than the role's lead time: a
   replica let go now could not be back sooner) and by at most ``max_step_down`` per tick.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from serving.planner.capacity import CapacityModel, ReplicaCapacity
from serving.planner.config import PlannerConfig, Role
from serving.planner.predictors import MovingAveragePredictor, Predictor, make_predictor
from serving.planner.sizing import replicas_for
from serving.planner.types import Decision, Load, Observation, RoleDecision, Traffic

_FALLBACK_INPUT_TOKENS = 1024.0
_FALLBACK_OUTPUT_TOKENS = 256.0
_CORRECTION_BOUNDS = (0.5, 3.0)
_LEAD_TIME_SAMPLES = 5


@dataclass
class PlannerState:
    """Owns the predictors, loop timers, hysteresis windows, corrections and lead times; the
    config and capacity model it holds are read-only. Mutated by ``tick`` only."""

    config: PlannerConfig
    capacity: CapacityModel
    rate: Predictor
    input_tokens: MovingAveragePredictor
    output_tokens: MovingAveragePredictor
    lead_time_s: dict[Role, float]
    measured_lead_times_s: dict[Role, deque[float]] = field(default_factory=dict)
    last_model_s: float | None = None
    model_targets: dict[Role, int] = field(default_factory=dict)
    model_reasons: dict[Role, str] = field(default_factory=dict)
    replica_rates: dict[Role, float] = field(default_factory=dict)
    history: dict[Role, deque[tuple[float, int]]] = field(default_factory=dict)
    queue_floor: dict[Role, int] = field(default_factory=dict)
    queue_ticks: dict[Role, int] = field(default_factory=dict)
    queued_since_model: dict[Role, bool] = field(default_factory=dict)
    corrections: dict[str, float] = field(default_factory=lambda: {"ttft": 1.0, "itl": 1.0})
    predicted: Load | None = None


def make_state(
    config: PlannerConfig,
    capacity: CapacityModel,
    lead_time_s: dict[Role, float] | None = None,
) -> PlannerState:
    """A fresh state; ``lead_time_s`` overrides the configured estimate per role (e.g. with
    the weights time read from MLflow)."""
    window_s = config.predictor.window_s
    estimates = {role: cfg.lead_time.estimate_s for role, cfg in config.roles.items()}
    return PlannerState(
        config=config,
        capacity=capacity,
        rate=make_predictor(config.predictor),
        input_tokens=MovingAveragePredictor(window_s),
        output_tokens=MovingAveragePredictor(window_s),
        lead_time_s=estimates | (lead_time_s or {}),
        measured_lead_times_s={role: deque(maxlen=_LEAD_TIME_SAMPLES) for role in config.roles},
        history={role: deque() for role in config.roles},
        queue_floor=dict.fromkeys(config.roles, 0),
        queue_ticks=dict.fromkeys(config.roles, 0),
        queued_since_model=dict.fromkeys(config.roles, False),
    )


def tick(observation: Observation, state: PlannerState) -> Decision:
    """One planner tick (see the module docstring); updates ``state``."""
    cfg = state.config
    current = {role: _current(observation, role) for role in cfg.roles}
    _update_lead_times(observation, state)
    traffic = observation.traffic
    if traffic is None:
        return _hold(observation, state, current)
    observed = _observe(observation.time_s, traffic, state)
    _update_corrections(observation, traffic, observed, state)
    t = observation.time_s
    if state.last_model_s is None or t - state.last_model_s >= cfg.scaling.model_interval_s - 1e-9:
        _model_targets(t, observed, current, state)
    desired, reasons = {}, {}
    for role in cfg.roles:
        floor = _fast_loop(observation, role, current[role], state)
        want = max(state.model_targets[role], floor)
        desired[role] = min(want, cfg.roles[role].replica_limit)
        queueing = floor > state.model_targets[role]
        reasons[role] = state.model_reasons[role] + (f"; {floor} for queueing" if queueing else "")
    desired, budget_note = _apply_budget(desired, cfg)
    roles = {}
    for role in cfg.roles:
        target, why = _stabilize(t, role, desired[role], current[role], state)
        reason = reasons[role] + (f"; {budget_note}" if budget_note else "") + why
        roles[role] = RoleDecision(
            role, current[role], target, reason, state.lead_time_s[role],
            state.replica_rates.get(role),
        )  # fmt: skip
    return Decision(
        time_s=t,
        roles=roles,
        observed=observed,
        predicted=state.predicted,
        corrections=dict(state.corrections),
        cost_usd_per_hour=cost_usd_per_hour(cfg, {r: d.target for r, d in roles.items()}),
    )


def cost_usd_per_hour(config: PlannerConfig, replicas: dict[Role, int]) -> float:
    """GPU cost of running ``replicas`` for one hour."""
    total = 0.0
    for role, count in replicas.items():
        role_cfg = config.roles[role]
        total += (
            count
            * role_cfg.gpus_per_replica
            * config.prices_usd_per_gpu_hour[role_cfg.instance_type]
        )
    return total


# -- steps of a tick ---------------------------------------------------------------------------


def _current(observation: Observation, role: Role) -> int:
    obs = observation.roles.get(role)
    return obs.current if obs is not None else 0


def _hold(observation: Observation, state: PlannerState, current: dict[Role, int]) -> Decision:
    cfg = state.config
    why = observation.error or "no traffic figures"
    roles = {}
    for role, role_cfg in cfg.roles.items():
        target = min(max(current[role], role_cfg.min_replicas), role_cfg.replica_limit)
        reason = f"metrics unavailable ({why}): holding {target} replica(s)"
        roles[role] = RoleDecision(role, current[role], target, reason, state.lead_time_s[role])
    return Decision(
        time_s=observation.time_s,
        roles=roles,
        observed=None,
        predicted=state.predicted,
        holding=True,
        corrections=dict(state.corrections),
        cost_usd_per_hour=cost_usd_per_hour(cfg, {r: d.target for r, d in roles.items()}),
    )


def _update_lead_times(observation: Observation, state: PlannerState) -> None:
    for role, role_cfg in state.config.roles.items():
        obs = observation.roles.get(role)
        if obs is None or not obs.lead_times_s or not role_cfg.lead_time.use_measured:
            continue
        samples = state.measured_lead_times_s[role]
        samples.extend(obs.lead_times_s)
        state.lead_time_s[role] = sum(samples) / len(samples)


def _observe(time_s: float, traffic: Traffic, state: PlannerState) -> Load:
    state.rate.observe(time_s, traffic.request_rate)
    if traffic.input_tokens is not None and traffic.num_requests > 0:
        state.input_tokens.observe(time_s, traffic.input_tokens)
    if traffic.output_tokens is not None and traffic.num_requests > 0:
        state.output_tokens.observe(time_s, traffic.output_tokens)
    isl, osl = _lengths(time_s, state)
    return Load(traffic.request_rate, isl, osl)


def _lengths(time_s: float, state: PlannerState) -> tuple[float, float]:
    isl = state.input_tokens.forecast(time_s, [0.0])[0] if state.input_tokens.samples else 0.0
    osl = state.output_tokens.forecast(time_s, [0.0])[0] if state.output_tokens.samples else 0.0
    return isl or _FALLBACK_INPUT_TOKENS, max(osl or _FALLBACK_OUTPUT_TOKENS, 1.0)


def _update_corrections(
    observation: Observation, traffic: Traffic, load: Load, state: PlannerState
) -> None:
    """Observed / expected TTFT and ITL at the observed load, smoothed (Dynamo's correction)."""
    cfg = state.config
    if traffic.num_requests < cfg.scaling.min_requests_for_correction:
        return
    # Queues say the pool is short: latencies then measure the shortage, not the model's error.
    for role_obs in observation.roles.values():
        if role_obs.num_waiting / max(role_obs.ready, 1) > cfg.scaling.queue_per_replica_up:
            return
    prefill_role: Role = "prefill" if "prefill" in cfg.roles else "both"
    decode_role: Role = "decode" if "decode" in cfg.roles else "both"
    updates = {}
    ready_p = max(_ready(observation, prefill_role), 1)
    if traffic.ttft_mean_s is not None:
        expected = state.capacity.expected_ttft_s(
            prefill_role, load.request_rate / ready_p, load.input_tokens, load.output_tokens
        )
        if expected > 0:
            updates["ttft"] = traffic.ttft_mean_s / expected
    decode_obs = observation.roles.get(decode_role)
    if traffic.itl_mean_s is not None and decode_obs is not None:
        ready_d = max(decode_obs.ready, 1)
        batch = decode_obs.num_running / ready_d if decode_obs.num_running else (
            load.request_rate * load.output_tokens * traffic.itl_mean_s / ready_d
        )  # fmt: skip
        expected = state.capacity.expected_itl_s(
            decode_role, load.request_rate / ready_d, batch, load.input_tokens, load.output_tokens
        )
        if expected > 0:
            updates["itl"] = traffic.itl_mean_s / expected
    alpha = cfg.scaling.correction_smoothing
    low, high = _CORRECTION_BOUNDS
    for key, ratio in updates.items():
        smoothed = (1 - alpha) * state.corrections[key] + alpha * ratio
        state.corrections[key] = min(max(smoothed, low), high)


def _ready(observation: Observation, role: Role) -> int:
    obs = observation.roles.get(role)
    return obs.ready if obs is not None else 0


def _model_targets(
    time_s: float, observed: Load, current: dict[Role, int], state: PlannerState
) -> None:
    """The slow loop: size every role for the predicted load (or the observed one)."""
    cfg = state.config
    state.last_model_s = time_s
    for role, role_cfg in cfg.roles.items():
        if cfg.scaling.lookahead == "lead_time":
            horizon_s = state.lead_time_s[role] + cfg.scaling.model_interval_s
            horizons = [horizon_s * i / 8 for i in range(9)]
            quantile = cfg.predictor.quantile
            rate = max(state.rate.forecast(time_s, horizons, quantile))
            band = f"p{quantile * 100:.0f} " if quantile else ""
            how = f"{band}peak of {state.rate.mode} over the next {horizon_s:.0f} s"
        else:
            rate = observed.request_rate
            how = "observed"
        load = Load(rate, observed.input_tokens, observed.output_tokens)
        state.predicted = load
        correction = _correction(role, state)
        per_replica, capacity_factor = _capacity(role, load, correction, state)
        in_latency = cfg.scaling.correction_applies_to == "latency"
        exact = rate * capacity_factor / per_replica.request_rate  # the load, in replicas
        # The margin goes on the size; the bands below compare the load with the current size.
        needed = replicas_for(exact, sqrt_headroom=cfg.scaling.sqrt_headroom)
        tolerance = cfg.scaling.tolerance
        down_tolerance = cfg.scaling.scale_down_tolerance
        down_tolerance = tolerance if down_tolerance is None else down_tolerance
        if needed < current[role] and exact > current[role] * (1 - down_tolerance):
            needed = current[role]  # barely below the current size: not worth a drain
        elif (
            needed > current[role]
            and per_replica.limit == "utilization"  # the SLA still holds a little above it
            and exact <= current[role] * (1 + tolerance)
        ):
            needed = current[role]
        state.replica_rates[role] = per_replica.request_rate / capacity_factor
        target = min(max(needed, role_cfg.min_replicas), role_cfg.replica_limit)
        state.model_targets[role] = target
        bound = (
            " (min)" if target > needed else (" (max)" if target < needed else "")
        )  # fmt: skip
        margin = (
            f" + {cfg.scaling.sqrt_headroom:g} sqrt" if cfg.scaling.sqrt_headroom else ""
        )  # fmt: skip
        state.model_reasons[role] = (
            f"{rate:.2f} req/s ({how}; {load.input_tokens:.0f}/{load.output_tokens:.0f} tokens)"
            f"{'' if in_latency else f' x{correction:.2f}'}"
            f" / {per_replica.request_rate:.2f} per replica"
            f"{f' (latencies x{correction:.2f})' if in_latency else ''}"
            f" ({per_replica.limit}){margin} -> {target}{bound}"
        )
        if not state.queued_since_model[role]:
            state.queue_floor[role] = 0
        state.queued_since_model[role] = False


def _capacity(
    role: Role, load: Load, correction: float, state: PlannerState
) -> tuple[ReplicaCapacity, float]:
    """One replica's capacity and the factor the load is multiplied by before dividing by it:
    the correction itself (``correction_applies_to: capacity``), or 1 with the correction in
    the latencies the capacity is found from (``latency``)."""
    isl, osl = load.input_tokens, load.output_tokens
    if state.config.scaling.correction_applies_to == "latency":
        return state.capacity.per_replica_corrected(role, isl, osl, correction), 1.0
    return state.capacity.per_replica(role, isl, osl), correction


def _correction(role: Role, state: PlannerState) -> float:
    if role == "prefill":
        return state.corrections["ttft"]
    if role == "decode":
        return state.corrections["itl"]
    return max(state.corrections["ttft"], state.corrections["itl"])


def _fast_loop(observation: Observation, role: Role, current: int, state: PlannerState) -> int:
    """One replica more than the role has while its queue stays long; returns the floor."""
    obs = observation.roles.get(role)
    scaling = state.config.scaling
    if obs is None:
        return state.queue_floor[role]
    if obs.num_waiting > 0:
        state.queued_since_model[role] = True
    if obs.num_waiting / max(obs.ready, 1) > scaling.queue_per_replica_up:
        state.queue_ticks[role] += 1
    else:
        state.queue_ticks[role] = 0
    if state.queue_ticks[role] >= scaling.queue_ticks_up and obs.starting == 0:
        state.queue_floor[role] = max(state.queue_floor[role], current + 1)
        state.queue_ticks[role] = 0
    return state.queue_floor[role]


def _apply_budget(desired: dict[Role, int], cfg: PlannerConfig) -> tuple[dict[Role, int], str]:
    """Fit the total GPU budget: each role keeps its minimum; the GPUs left are shared in
    proportion to what each role wants above it (largest remainders get the odd GPUs)."""
    budget = cfg.max_total_gpus
    gpus = {role: cfg.roles[role].gpus_per_replica for role in desired}
    wanted = sum(desired[r] * gpus[r] for r in desired)
    if budget is None or wanted <= budget:
        return desired, ""
    floor = {r: cfg.roles[r].min_replicas for r in desired}
    spare = budget - sum(floor[r] * gpus[r] for r in desired)
    extra_gpus = {r: (desired[r] - floor[r]) * gpus[r] for r in desired}
    total_extra = sum(extra_gpus.values())
    shares = {r: spare * extra_gpus[r] / total_extra for r in desired}
    result = {r: floor[r] + math.floor(shares[r] / gpus[r]) for r in desired}
    left = budget - sum(result[r] * gpus[r] for r in desired)
    for r in sorted(desired, key=lambda r: shares[r] / gpus[r] - math.floor(shares[r] / gpus[r]),
                    reverse=True):  # fmt: skip
        if left >= gpus[r] and result[r] < desired[r]:
            result[r] += 1
            left -= gpus[r]
    return result, f"GPU budget {budget} (wanted {wanted})"


def _stabilize(
    time_s: float, role: Role, desired: int, current: int, state: PlannerState
) -> tuple[int, str]:
    """Up at once (bounded per tick); down only to the window's highest target, one step."""
    scaling = state.config.scaling
    role_cfg = state.config.roles[role]
    history = state.history[role]
    if not history:  # a (re)started planner waits a whole window before it scales down
        history.append((time_s, current))
    history.append((time_s, desired))
    # Looking ahead, never shorter than the lead time: what goes now could not be back sooner.
    window_s = scaling.scale_down_stabilization_s
    if scaling.lookahead == "lead_time":
        window_s = max(window_s, state.lead_time_s[role])
    while history and history[0][0] < time_s - window_s:
        history.popleft()
    if desired > current:
        target = min(desired, current + scaling.max_step_up)
        why = f"; up {target - current}" + (" (step limit)" if target < desired else "")
    elif desired < current:
        floor = max(d for _, d in history)
        target = max(floor, current - scaling.max_step_down)
        if target >= current:
            target, why = current, f"; down held (wanted {floor} in the last {window_s:.0f} s)"
        else:
            why = f"; down {current - target}"
    else:
        target, why = current, ""
    target = min(max(target, role_cfg.min_replicas), role_cfg.replica_limit)
    return target, why
