"""How much load one replica of each role sustains inside the SLA, from a measured profile.

NOTE: the model. ``S`` is the prefill compute of one prompt (chunks of the step budget, several
short prompts per step when they fit), ``d(B, c)`` the decode step of ``B`` sequences at mean
context ``c = isl + osl / 2`` (the profile's grid), ``r`` the request rate of one replica.

* prefill replica: a queue in front of chunked prefill. TTFT = ``P(isl)`` (a lone prompt) plus
  the M/D/1 wait ``rho * S / (2 (1 - rho))`` at utilisation ``rho = r * S``; the largest ``rho``
  with TTFT inside the budget (TTFT minus the KV pull and the first decode step) is the bound.
* decode replica: ``B`` sequences decode together; ITL = ``d(B, c)``. The largest ``B`` with
  ITL inside the SLA, under ``max_num_seqs`` and the KV pool (``B * c`` tokens), gives
  ``r = B / (d(B, c) * osl)``.
* aggregated replica: prefill takes the share ``phi = r * S`` of the time and decode the rest,
  so the mean ITL is ``d(B, c) / (1 - phi)`` with ``B = r * osl * ITL`` (Little's law); TTFT is
  ``P(isl)``, plus one decode step per prefill chunk, plus the M/D/1 wait at ``phi``. The
  largest ``r`` meeting both is found by bisection.

Each role's rate is then capped at ``target_utilization`` of its saturation rate (headroom for
bursts and forecast error). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from serving.planner.config import Role, SlaConfig
from serving.planner.profile import PerfProfile

_KV_MAX_USAGE = 0.95  # the share of the pool the steady state may fill (preemption headroom)


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    """What one replica sustains for requests of this shape."""

    request_rate: float  # requests/s inside the SLA and the utilisation target
    limit: str  # what binds: ttft | itl | kv | max_num_seqs | utilization | infeasible:<what>
    batch_size: float  # decode sequences at that rate (0 for a prefill replica)
    itl_s: float  # expected mean ITL at that rate (0 for a prefill replica)
    ttft_s: float  # expected TTFT at that rate (0 for a decode replica)


class CapacityModel:
    """Owns the profile and the SLA; answers capacity questions; no I/O."""

    def __init__(
        self,
        profile: PerfProfile,
        sla: SlaConfig,
        *,
        target_utilization: float = 0.85,
        kv_transfer_s: float = 0.0,
    ) -> None:
        self.profile = profile
        self.sla = sla
        self.target_utilization = target_utilization
        self.kv_transfer_s = kv_transfer_s
        kv = profile.kv_capacity_tokens
        # Without a known pool (an endpoint profile), max_num_seqs full contexts fit by fiat.
        self.kv_capacity_tokens = kv if kv is not None else math.inf
        self.capacity = lru_cache(maxsize=4096)(self._capacity)
        self._corrected: dict[float, CapacityModel] = {}

    # -- the public questions ------------------------------------------------------------------

    def per_replica(self, role: Role, isl: float, osl: float) -> ReplicaCapacity:
        """One replica's capacity for requests of about this shape (cached)."""
        return self.capacity(role, _round(isl), _round(osl))

    def per_replica_corrected(
        self, role: Role, isl: float, osl: float, latency_factor: float
    ) -> ReplicaCapacity:
        """The capacity when real latencies are ``latency_factor`` times the model's: the
        model's answer for an SLA divided by that factor (the factor rounded to 1%)."""
        factor = round(latency_factor, 2)
        if factor == 1.0:
            return self.per_replica(role, isl, osl)
        model = self._corrected.get(factor)
        if model is None:
            sla = SlaConfig(ttft_s=self.sla.ttft_s / factor, itl_s=self.sla.itl_s / factor)
            model = CapacityModel(self.profile, sla, target_utilization=self.target_utilization,
                                  kv_transfer_s=self.kv_transfer_s)  # fmt: skip
            self._corrected[factor] = model
        return model.per_replica(role, isl, osl)

    def replicas_needed(self, role: Role, rate: float, isl: float, osl: float) -> int:
        """Replicas of ``role`` for ``rate`` requests/s of this shape (0 for no traffic)."""
        if rate <= 0:
            return 0
        return math.ceil(rate / self.per_replica(role, isl, osl).request_rate - 1e-9)

    def expected_ttft_s(self, role: Role, rate_per_replica: float, isl: float, osl: float) -> float:
        """TTFT the model expects at this per-replica rate (for the correction factor)."""
        if role == "decode":
            return 0.0
        s = self._prompt_service_s(isl)
        rho = min(rate_per_replica * s, 0.95)
        base = self.profile.prompt_prefill_s(isl)
        if role == "both":
            base += self._num_chunks(isl) * self.profile.decode_step_s(1, _context(isl, osl))
        return base + _mdl_wait_s(rho, s)

    def expected_itl_s(
        self, role: Role, rate_per_replica: float, batch_size: float, isl: float, osl: float
    ) -> float:
        """Mean ITL the model expects for this batch (an aggregated replica also prefills)."""
        step = self.profile.decode_step_s(max(batch_size, 1.0), _context(isl, osl))
        if role != "both":
            return step
        phi = min(rate_per_replica * self._prompt_service_s(isl), 0.9)
        return step / (1 - phi)

    # -- per role ------------------------------------------------------------------------------

    def _capacity(self, role: Role, isl: float, osl: float) -> ReplicaCapacity:
        if role == "prefill":
            return self._prefill(isl)
        if role == "decode":
            return self._decode(isl, osl)
        return self._aggregated(isl, osl)

    def _prefill(self, isl: float) -> ReplicaCapacity:
        s = self._prompt_service_s(isl)
        alone = self.profile.prompt_prefill_s(isl)
        budget = self.sla.ttft_s - self.kv_transfer_s - self.sla.itl_s - alone
        if budget <= 0:
            rate = self.target_utilization / s
            return ReplicaCapacity(rate, "infeasible:ttft", 0.0, 0.0, alone)
        rho_sla = 2 * budget / (s + 2 * budget)
        rho = min(self.target_utilization, rho_sla)
        limit = "ttft" if rho_sla < self.target_utilization else "utilization"
        return ReplicaCapacity(rho / s, limit, 0.0, 0.0, alone + _mdl_wait_s(rho, s))

    def _decode(self, isl: float, osl: float) -> ReplicaCapacity:
        context = _context(isl, osl)
        batch_max, bound = self._batch_bound(isl, osl)
        step = self.profile.decode_step_s
        if step(1, context) > self.sla.itl_s:
            rate = self.target_utilization / (step(1, context) * osl)
            return ReplicaCapacity(rate, "infeasible:itl", 1.0, step(1, context), 0.0)
        batch = _largest(1, batch_max, lambda b: step(b, context) <= self.sla.itl_s)
        limit = bound if batch == batch_max else "itl"
        saturated = batch_max / (step(batch_max, context) * osl)
        rate = batch / (step(batch, context) * osl)
        if rate > self.target_utilization * saturated:
            rate, limit = self.target_utilization * saturated, "utilization"
        return ReplicaCapacity(
            rate, limit, rate * osl * step(batch, context), step(batch, context), 0.0
        )

    def _aggregated(self, isl: float, osl: float) -> ReplicaCapacity:
        s = self._prompt_service_s(isl)
        saturated = _bisect_rate(lambda r: self._aggregated_state(r, isl, osl) is not None, 1.0 / s)
        slo_rate = _bisect_rate(lambda r: self._meets_sla(r, isl, osl), saturated)
        rate, limit = slo_rate, "sla"
        if rate > self.target_utilization * saturated:
            rate, limit = self.target_utilization * saturated, "utilization"
        state = self._aggregated_state(rate, isl, osl)
        if rate <= 0 or state is None:
            # Not even a trickle meets the SLA: size by throughput and say so.
            rate = self.target_utilization * saturated
            state = self._aggregated_state(rate, isl, osl) or (1.0, 0.0, 0.0)
            return ReplicaCapacity(rate, "infeasible:sla", *state)
        if limit == "sla":
            batch_max, bound = self._batch_bound(isl, osl)
            ttft_ok = state[2] <= self.sla.ttft_s
            limit = "itl" if ttft_ok else "ttft"
            if state[0] >= batch_max * 0.999:
                limit = bound
        return ReplicaCapacity(rate, limit, *state)

    # -- helpers -------------------------------------------------------------------------------

    def _aggregated_state(
        self, rate: float, isl: float, osl: float
    ) -> tuple[float, float, float] | None:
        """(batch, mean ITL, TTFT) of an aggregated replica at ``rate``; None if it cannot keep
        up (the batch outgrows the pool or ``max_num_seqs``, or prefill takes all the time)."""
        s = self._prompt_service_s(isl)
        phi = rate * s
        if phi >= 0.98:
            return None
        context = _context(isl, osl)
        batch_max, _ = self._batch_bound(isl, osl)
        batch = 1.0
        for _ in range(50):  # B = r * osl * d(B) / (1 - phi): a monotone fixed point
            itl = self.profile.decode_step_s(batch, context) / (1 - phi)
            new_batch = max(rate * osl * itl, 1.0)
            if new_batch > batch_max:
                return None
            if abs(new_batch - batch) < 1e-3:
                batch = new_batch
                break
            batch = new_batch
        itl = self.profile.decode_step_s(batch, context) / (1 - phi)
        ttft = (
            self.profile.prompt_prefill_s(isl)
            + self._num_chunks(isl) * self.profile.decode_step_s(batch, context)
            + _mdl_wait_s(phi, s)
        )
        return batch, itl, ttft

    def _meets_sla(self, rate: float, isl: float, osl: float) -> bool:
        state = self._aggregated_state(rate, isl, osl)
        return state is not None and state[1] <= self.sla.itl_s and state[2] <= self.sla.ttft_s

    def _batch_bound(self, isl: float, osl: float) -> tuple[int, str]:
        by_kv = (
            int(self.kv_capacity_tokens * _KV_MAX_USAGE / _context(isl, osl))
            if math.isfinite(self.kv_capacity_tokens)
            else self.profile.max_num_seqs
        )
        if by_kv < self.profile.max_num_seqs:
            return max(by_kv, 1), "kv"
        return self.profile.max_num_seqs, "max_num_seqs"

    def _prompt_service_s(self, isl: float) -> float:
        """Prefill compute per prompt; short prompts share a step up to the token budget."""
        alone = self.profile.prompt_prefill_s(isl)
        chunk = self.profile.max_num_batched_tokens
        if chunk is None or isl <= 0 or isl > chunk / 2:
            return max(alone, 1e-6)
        per_step = min(int(chunk // isl), self.profile.max_num_seqs)
        return max(min(alone, self.profile.prefill_step_s(per_step * isl) / per_step), 1e-6)

    def _num_chunks(self, isl: float) -> int:
        chunk = self.profile.max_num_batched_tokens
        return 1 if chunk is None else max(1, math.ceil(isl / chunk))


def _context(isl: float, osl: float) -> float:
    return isl + osl / 2


def _mdl_wait_s(rho: float, service_s: float) -> float:
    """Mean wait in an M/D/1 queue."""
    if rho <= 0:
        return 0.0
    rho = min(rho, 0.999)
    return rho * service_s / (2 * (1 - rho))


def _largest(low: int, high: int, ok) -> int:
    """The largest ``n`` in ``[low, high]`` with ``ok(n)`` for a monotone ``ok``; ``ok(low)``
    is assumed."""
    while low < high:
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _bisect_rate(ok, high: float, iterations: int = 40) -> float:
    """The largest rate in ``[0, high]`` for a monotone ``ok`` (0 if none)."""
    low = 0.0
    if ok(high):
        return high
    for _ in range(iterations):
        mid = (low + high) / 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def _round(value: float) -> float:
    """Two significant digits: nearby shapes share a cache entry; capacity barely moves."""
    if value <= 0:
        return 1.0
    digits = 1 - math.floor(math.log10(value))
    return max(round(value, digits), 1.0)
