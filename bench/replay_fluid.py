"""A request-level simulator of continuous-batching workers, for day-long planner studies.

``bench/replay.py`` steps real ``EngineCore``s token by token: exact, and about 10k output
tokens per second of wall time here, so a day of traffic would take hours. This model keeps
the engine's scheduling rules but jumps over the steps in which nothing changes:

* a worker runs steps; a step prefills up to ``max_num_batched_tokens`` prompt tokens (first in,
  first out, several prompts per step when they fit) and decodes one token for every running
  sequence; it costs ``prefill_ms(chunk) + decode_ms(...)`` of the mock's timing model;
* requests are admitted while ``max_num_seqs`` and the KV pool allow (prompt and output reserved
  at admission, so nothing is preempted), else they wait;
* between two events (an arrival, a prompt finishing, a sequence finishing) the batch is
  constant, so ``k`` steps are computed at once (the step time follows the KV in use, taken at
  the middle of the stretch); an arrival lets the current step finish and joins the next one;
* disaggregated: a prefill worker's finished prompt is pulled by a decode worker
  (``tokens * kv_bytes_per_token / bandwidth``), which then decodes it.

No prefix cache (every prompt is computed in full) and no per-token gaps: a request's ITL is
the mean over its output. ``tests/bench/test_replay_fluid.py`` checks this model against the
engine simulator on the same requests. Virtual time only; no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from serving.engine.timing import TimingProfile
from serving.planner.connectors.base import ReplicaCounts

_ARRIVAL, _READY, _TRANSFER, _SEGMENT, _CALLBACK = 0, 1, 2, 3, 4
_MAX_SEGMENT_STEPS = 256  # re-price the step at least this often (the KV in use grows)


@dataclass(slots=True, eq=False)
class SimRequest:
    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    remaining_prefill: int = 0
    first_token_s: float = -1.0
    finish_s: float = -1.0
    finish_step: int = 0
    join_step: int = 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def itl_s(self) -> float:
        """Mean gap between output tokens (0 for a one-token answer)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class WorkerShape:
    """One replica's engine limits (the replay's defaults: an H100 with Llama-3-8B)."""

    kv_capacity_tokens: int = 1024 * 512
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    speedup: float = 1.0


class StepCost:
    """Step time from the mock's timing model; ``speedup`` divides it as in the engine."""

    def __init__(self, profile: TimingProfile, shape: WorkerShape) -> None:
        self.profile = profile
        self.shape = shape
        self._prefill = {}

    def prefill_s(self, num_tokens: int) -> float:
        cached = self._prefill.get(num_tokens)
        if cached is None:
            cached = self.profile.prefill_ms(num_tokens) / 1000.0 / self.shape.speedup
            self._prefill[num_tokens] = cached
        return cached

    def decode_s(self, batch: int, mean_context: float, kv_usage: float) -> float:
        ms = self.profile.decode_step_ms(batch, mean_context, kv_usage)
        return ms / 1000.0 / self.shape.speedup


class FluidWorker:
    """One replica: its queues, batch and KV; stepped by ``FluidCluster``; no I/O."""

    def __init__(self, worker_id: str, role: str, created_s: float, ready_s: float) -> None:
        self.worker_id = worker_id
        self.role = role
        self.created_s = created_s
        self.ready_s = ready_s
        self.removed_s: float | None = None
        self.state = "starting"  # starting | ready | draining | gone
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: deque[SimRequest] = deque()
        self.prefill_tokens = 0  # prompt tokens still to compute, over ``prefilling``
        self.decoding: list[tuple[int, int, SimRequest]] = []  # (finish step, index, request)
        self.kv_reserved = 0
        self.context_sum = 0  # prompt + join offsets of the decoding requests (see context)
        self.steps = 0
        self.first_pending: list[SimRequest] = []  # pulled prompts: first token this stretch
        self.busy = False
        self.segment_start_s = 0.0
        self.segment_steps = 0
        self.step_s = 0.0
        self.version = 0

    @property
    def num_active(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + max(len(self.prefilling) - 1, 0)

    def decode_context(self) -> float:
        """Mean context of the decoding sequences at the current step count."""
        n = len(self.decoding)
        return (self.context_sum + n * self.steps) / n if n else 0.0


class FluidCluster:
    """Workers, routing and one event heap in virtual time. Implements the planner's
    ``VirtualCluster`` (``provision``, ``cancel_starting``, ``drain_one``, ``counts``)."""

    def __init__(
        self,
        cost: StepCost,
        *,
        lead_time_s: float,
        kv_bytes_per_token: int = 131_072,
        kv_bandwidth_gbps: float = 25.0,
        on_finish: Callable[[SimRequest], None] = lambda r: None,
        on_arrival: Callable[[SimRequest], None] = lambda r: None,
    ) -> None:
        self.cost = cost
        self.shape = cost.shape
        self.lead_time_s = lead_time_s
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_bandwidth = kv_bandwidth_gbps * 1e9
        self.on_finish = on_finish
        self.on_arrival = on_arrival
        self.now = 0.0
        self.workers: dict[str, FluidWorker] = {}
        self.retired: list[FluidWorker] = []
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._lead_samples: dict[str, list[float]] = {}
        self._arrivals: Iterator[SimRequest] | None = None
        self.num_rejected = 0

    # -- the VirtualCluster interface ----------------------------------------------------------

    def counts(self, role: str) -> ReplicaCounts:
        ready = starting = draining = 0
        for w in self.workers.values():
            if w.role != role:
                continue
            ready += w.state == "ready"
            starting += w.state == "starting"
            draining += w.state == "draining"
        samples = tuple(self._lead_samples.pop(role, ()))
        return ReplicaCounts(ready, starting, draining, samples)

    def provision(self, role: str, lead_time_s: float | None = None) -> FluidWorker:
        lead = self.lead_time_s if lead_time_s is None else lead_time_s
        worker = FluidWorker(f"{role[0]}{next(self._ids)}", role, self.now, self.now + lead)
        self.workers[worker.worker_id] = worker
        if lead <= 0:
            self._on_ready(worker)
        else:
            self._push(worker.ready_s, _READY, worker)
        return worker

    def cancel_starting(self, role: str) -> bool:
        starting = [w for w in self.workers.values() if w.role == role and w.state == "starting"]
        if not starting:
            return False
        self._retire(max(starting, key=lambda w: w.created_s))  # the newest is furthest away
        return True

    def drain_one(self, role: str) -> bool:
        ready = [w for w in self.workers.values() if w.role == role and w.state == "ready"]
        if not ready:
            return False
        worker = min(ready, key=lambda w: (w.num_active, w.worker_id))
        worker.state = "draining"
        if worker.num_active == 0 and not worker.busy:
            self._retire(worker)
        return True

    # -- driving -------------------------------------------------------------------------------

    def feed(self, arrivals: Iterator[SimRequest]) -> None:
        """Requests in arrival order; pulled one at a time as virtual time reaches them."""
        self._arrivals = arrivals
        self._next_arrival()

    def schedule(self, time_s: float, callback: Callable[[], None]) -> None:
        self._push(time_s, _CALLBACK, callback)

    def run(self, until_s: float = math.inf) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until_s:
            time_s, kind, _, _, payload = heapq.heappop(heap)
            self.now = time_s
            if kind == _ARRIVAL:
                self.on_arrival(payload)
                self._route(payload)
                self._next_arrival()
            elif kind == _SEGMENT:
                worker, version = payload
                if worker.version == version:
                    self._end_segment(worker)
            elif kind == _TRANSFER:
                self._route_decode(payload)
            elif kind == _READY:
                if payload.state == "starting":
                    self._on_ready(payload)
            else:
                payload()

    def has_work(self) -> bool:
        return any(w.num_active for w in self.workers.values())

    def _push(self, time_s: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (time_s, kind, next(self._seq), 0, payload))

    def _next_arrival(self) -> None:
        request = next(self._arrivals, None) if self._arrivals is not None else None
        if request is not None:
            self._push(request.arrival_s, _ARRIVAL, request)

    def _on_ready(self, worker: FluidWorker) -> None:
        worker.state = "ready"
        self._lead_samples.setdefault(worker.role, []).append(self.now - worker.created_s)
        if worker.waiting:
            self._start_segment(worker)

    def _retire(self, worker: FluidWorker) -> None:
        worker.state = "gone"
        worker.removed_s = self.now
        worker.version += 1
        del self.workers[worker.worker_id]
        self.retired.append(worker)

    # -- routing -------------------------------------------------------------------------------

    def _candidates(self, roles: tuple[str, ...]) -> list[FluidWorker]:
        return [w for w in self.workers.values() if w.state == "ready" and w.role in roles]

    def _route(self, request: SimRequest) -> None:
        if request.input_tokens + request.output_tokens > self.shape.kv_capacity_tokens:
            self.num_rejected += 1
            return
        prefill = self._candidates(("prefill",))
        if prefill:
            worker = min(
                prefill, key=lambda w: (w.prefill_tokens + _queued_tokens(w), w.num_active)
            )
        else:
            serving = self._candidates(("both", "decode"))
            if not serving:  # nothing serves yet: wait at the least busy one that will
                serving = [w for w in self.workers.values() if w.state != "gone"]
            worker = min(serving, key=lambda w: (w.num_active, w.prefill_tokens))
        request.remaining_prefill = request.input_tokens
        worker.waiting.append(request)
        self._wake(worker)

    def _route_decode(self, request: SimRequest) -> None:
        decode = self._candidates(("decode",)) or self._candidates(("both",))
        if not decode:  # every decode worker is starting: wait at one
            decode = [w for w in self.workers.values() if w.role in ("decode", "both")]
        worker = min(decode, key=lambda w: (len(w.decoding) + len(w.waiting), w.kv_reserved))
        request.remaining_prefill = 0
        worker.waiting.append(request)
        self._wake(worker)

    # -- a worker's steps ----------------------------------------------------------------------

    def _wake(self, worker: FluidWorker) -> None:
        """A request joined: start stepping, or end the current stretch after this step."""
        if worker.state == "starting":
            return  # it steps once ready
        if not worker.busy:
            self._start_segment(worker)
            return
        done = math.floor((self.now - worker.segment_start_s) / worker.step_s) + 1
        if done < worker.segment_steps:
            worker.segment_steps = done
            worker.version += 1
            end_s = worker.segment_start_s + done * worker.step_s
            self._push(end_s, _SEGMENT, (worker, worker.version))

    def _admit(self, worker: FluidWorker) -> None:
        shape = self.shape
        while worker.waiting:
            request = worker.waiting[0]
            running = len(worker.prefilling) + len(worker.decoding)
            kv = request.input_tokens + request.output_tokens
            if running >= shape.max_num_seqs or worker.kv_reserved + kv > shape.kv_capacity_tokens:
                return
            worker.waiting.popleft()
            worker.kv_reserved += kv
            if request.remaining_prefill > 0:
                worker.prefilling.append(request)
                worker.prefill_tokens += request.remaining_prefill
            else:  # a pulled prompt: decodes from its next step on (first token then)
                self._join_decode(worker, request)
                worker.first_pending.append(request)

    def _join_decode(self, worker: FluidWorker, request: SimRequest) -> None:
        request.join_step = worker.steps
        remaining = request.output_tokens - (1 if request.first_token_s >= 0 else 0)
        request.finish_step = worker.steps + remaining
        worker.context_sum += request.input_tokens - worker.steps
        heapq.heappush(worker.decoding, (request.finish_step, request.index, request))

    def _start_segment(self, worker: FluidWorker) -> None:
        self._admit(worker)
        if not worker.prefilling and not worker.decoding:
            worker.busy = False
            if worker.state == "draining" and not worker.waiting:
                self._retire(worker)
            return
        budget = self.shape.max_num_batched_tokens
        steps = _MAX_SEGMENT_STEPS
        chunk = 0
        if worker.prefilling:
            chunk = min(budget, worker.prefill_tokens)
            head = worker.prefilling[0].remaining_prefill
            steps = 1 if worker.prefill_tokens <= budget else max(1, min(steps, head // budget))
        if worker.decoding:
            steps = min(steps, max(worker.decoding[0][0] - worker.steps, 1))
        step_s = self.cost.prefill_s(chunk) if chunk else 0.0
        if worker.decoding:
            batch = len(worker.decoding)
            context = worker.decode_context() + steps / 2
            usage = (batch * context + worker.prefill_tokens) / self.shape.kv_capacity_tokens
            step_s += self.cost.decode_s(batch, context, min(usage, 1.0))
        worker.busy = True
        worker.segment_start_s = self.now
        worker.segment_steps = steps
        worker.step_s = max(step_s, 1e-9)
        worker.version += 1
        self._push(self.now + steps * worker.step_s, _SEGMENT, (worker, worker.version))

    def _end_segment(self, worker: FluidWorker) -> None:
        steps = worker.segment_steps
        worker.steps += steps
        now = self.now
        for request in worker.first_pending:
            request.first_token_s = worker.segment_start_s + worker.step_s
        worker.first_pending.clear()
        if worker.prefilling:
            self._advance_prefill(worker, steps * self.shape.max_num_batched_tokens, now)
        while worker.decoding and worker.decoding[0][0] <= worker.steps:
            _, _, request = heapq.heappop(worker.decoding)
            self._finish(worker, request, now)
        self._start_segment(worker)

    def _advance_prefill(self, worker: FluidWorker, tokens: int, now: float) -> None:
        while worker.prefilling and tokens > 0:
            head = worker.prefilling[0]
            used = min(tokens, head.remaining_prefill)
            head.remaining_prefill -= used
            worker.prefill_tokens -= used
            tokens -= used
            if head.remaining_prefill > 0:
                return
            worker.prefilling.popleft()
            if worker.role == "prefill":  # hand the KV to a decode worker
                worker.kv_reserved -= head.input_tokens + head.output_tokens
                pull_s = head.input_tokens * self.kv_bytes_per_token / self.kv_bandwidth
                self._push(now + pull_s, _TRANSFER, head)
            else:
                head.first_token_s = now
                if head.output_tokens <= 1:
                    self._finish(worker, head, now)
                else:
                    self._join_decode(worker, head)

    def _finish(self, worker: FluidWorker, request: SimRequest, now: float) -> None:
        if request.first_token_s < 0:
            request.first_token_s = now
        request.finish_s = now
        if request.finish_step:
            worker.context_sum -= request.input_tokens - request.join_step
        worker.kv_reserved -= request.input_tokens + request.output_tokens
        self.on_finish(request)


def _queued_tokens(worker: FluidWorker) -> int:
    return sum(r.input_tokens for r in worker.waiting)
