"""Routing policies behind one interface, and the router's own view of each worker's load; no I/O.

Every policy answers ``choose(request, worker_ids) -> RoutingDecision``. ``kv`` scores workers by
their cached prefix (from ``KVIndexer``) and load; ``approx`` does the same from the router's
own past decisions; ``round-robin``, ``random``, ``least-loaded`` and ``session`` ignore caches.
Clocks and random seeds are injected, so every decision is reproducible in tests.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from serving.router.indexer import DEFAULT_MEDIUM, KVIndexer, PrefixMatches

PolicyName = Literal["kv", "approx", "round-robin", "random", "least-loaded", "session"]
DecisionReason = Literal[
    "min-cost",  # kv/approx: lowest cost (ties to the less loaded worker)
    "sampled",  # kv/approx: softmax sampling over costs
    "round-robin",
    "random",
    "least-loaded",
    "sticky",  # session: the session's worker
    "new-session",  # session: first request of a session, to the least loaded worker
    "sticky-worker-gone",  # session: its worker left, rebound to the least loaded worker
    "no-session",  # session: request without a session key, to the least loaded worker
]
POLICY_NAMES: tuple[PolicyName, ...] = (
    "kv",
    "approx",
    "round-robin",
    "random",
    "least-loaded",
    "session",
)
# Credit per cached block by tier: device 1.0, host 0.75, disk 0.25, S3 lower still.
DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"GPU": 1.0, "CPU": 0.75, "DISK": 0.25, "S3": 0.1}
_COST_TIE_EPS = 1e-9
# Weight of an uncached prompt block against one block of decode load. Measured on the
# Mooncake conversation trace (8 mock workers, docs/replay.md): 1 reaches 70% of the
# shared-cache hit-rate bound, 4 reaches 87%, 16 reaches 92% with per-worker load still even
# (max/mean 1.07), so 16 is the default.
DEFAULT_PREFILL_SCALE = 16.0


class NoWorkersError(RuntimeError):
    """A routing decision was asked for with no worker to choose from."""


@dataclass(frozen=True)
class RequestView:
    """What a policy sees of a request: size, router block hashes of the prompt, session key."""

    request_id: str
    num_prompt_tokens: int
    block_hashes: Sequence[int] = ()  # chain hashes of the prompt's full blocks
    session_id: str | None = None


@dataclass(frozen=True)
class RoutingDecision:
    """The chosen worker, and why (for metrics and logs)."""

    worker_id: str
    policy: PolicyName
    reason: DecisionReason
    worker_costs: dict[str, float] = field(default_factory=dict)  # kv/approx, in blocks
    num_cached_blocks: int = 0  # the chosen worker's cached prefix (kv/approx)


@dataclass(frozen=True)
class KVCostConfig:
    """``cost = prefill_scale * max(prefill_blocks - credits, 0) + active_decode_blocks``."""

    block_size: int
    prefill_scale: float = DEFAULT_PREFILL_SCALE
    tier_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    temperature: float = 0.0  # 0: argmin; > 0: softmax sampling over normalized costs


class RoutingPolicy(Protocol):
    name: PolicyName

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision: ...


class PrefixSource(Protocol):
    def find_matches(self, block_hashes: Sequence[int]) -> PrefixMatches: ...


# Load


@dataclass
class _ActiveRequest:
    worker_id: str
    num_prefill_tokens: int  # uncached prompt tokens, until the first token
    num_tokens: int  # prompt + output so far
    num_blocks: int


@dataclass
class _WorkerTotals:
    active_prefill_tokens: int = 0
    active_decode_blocks: int = 0
    num_active_requests: int = 0


class WorkerLoad:
    """Owns the router's count of each worker's active prefill tokens and KV blocks; no I/O.

    A request adds its uncached prompt tokens and its KV blocks when routed; the prefill
    tokens go at its first token, the blocks grow with output and go when it finishes.
    Unknown request ids are ignored (a request may finish after its worker was removed).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._requests: dict[str, _ActiveRequest] = {}
        self._workers: dict[str, _WorkerTotals] = {}

    def add_request(
        self, request_id: str, worker_id: str, num_prompt_tokens: int, num_cached_tokens: int = 0
    ) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        num_prefill_tokens = max(num_prompt_tokens - num_cached_tokens, 0)
        request = _ActiveRequest(
            worker_id, num_prefill_tokens, num_prompt_tokens, self._num_blocks(num_prompt_tokens)
        )
        self._requests[request_id] = request
        totals = self._workers.setdefault(worker_id, _WorkerTotals())
        totals.active_prefill_tokens += num_prefill_tokens
        totals.active_decode_blocks += request.num_blocks
        totals.num_active_requests += 1

    def mark_prefill_done(self, request_id: str) -> None:
        """The request produced its first token; idempotent."""
        request = self._requests.get(request_id)
        if request is None:
            return
        self._workers[request.worker_id].active_prefill_tokens -= request.num_prefill_tokens
        request.num_prefill_tokens = 0

    def add_output_tokens(self, request_id: str, num_tokens: int) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        request.num_tokens += num_tokens
        num_blocks = self._num_blocks(request.num_tokens)
        self._workers[request.worker_id].active_decode_blocks += num_blocks - request.num_blocks
        request.num_blocks = num_blocks

    def finish_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        totals = self._workers[request.worker_id]
        totals.active_prefill_tokens -= request.num_prefill_tokens
        totals.active_decode_blocks -= request.num_blocks
        totals.num_active_requests -= 1

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker and its active requests."""
        self._workers.pop(worker_id, None)
        for request_id in [r for r, req in self._requests.items() if req.worker_id == worker_id]:
            del self._requests[request_id]

    def active_prefill_tokens(self, worker_id: str) -> int:
        return self._totals(worker_id).active_prefill_tokens

    def active_decode_blocks(self, worker_id: str) -> int:
        return self._totals(worker_id).active_decode_blocks

    def num_active_requests(self, worker_id: str) -> int:
        return self._totals(worker_id).num_active_requests

    def load_key(self, worker_id: str) -> tuple[int, int]:
        """Orders workers from least to most loaded: decode blocks, then prefill tokens."""
        totals = self._totals(worker_id)
        return (totals.active_decode_blocks, totals.active_prefill_tokens)

    def least_loaded(self, worker_ids: Sequence[str]) -> str:
        """The least loaded worker; the earliest listed among equals."""
        if not worker_ids:
            raise NoWorkersError("no workers to choose from")
        return min(worker_ids, key=self.load_key)

    def _totals(self, worker_id: str) -> _WorkerTotals:
        return self._workers.get(worker_id) or _WorkerTotals()

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


# Cost


def credit_blocks(medium_blocks: Mapping[str, int], tier_weights: Mapping[str, float]) -> float:
    """Cached blocks weighted by tier; tiers without a weight earn nothing."""
    return sum(n * tier_weights.get(medium, 0.0) for medium, n in medium_blocks.items())


def kv_cost(
    num_prefill_blocks: int,
    medium_blocks: Mapping[str, int],
    active_decode_blocks: int,
    config: KVCostConfig,
) -> float:
    """``prefill_scale * max(prefill_blocks - credits, 0) + active_decode_blocks``, in blocks."""
    credits = credit_blocks(medium_blocks, config.tier_weights)
    return config.prefill_scale * max(num_prefill_blocks - credits, 0.0) + active_decode_blocks


def softmax_sample(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index sampled with ``p ~ exp(-normalized_cost / temperature)``; costs scaled to [0, 1]."""
    low, high = min(costs), max(costs)
    spread = high - low
    weights = [math.exp(-((c - low) / spread) / temperature) if spread else 1.0 for c in costs]
    point = rng.random() * sum(weights)
    for i, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return i
    return len(costs) - 1


# Policies


class KVPolicy:
    """Routes to the lowest-cost worker by cached prefix and load; owns only its RNG."""

    name: PolicyName = "kv"

    def __init__(
        self, source: PrefixSource, load: WorkerLoad, config: KVCostConfig, seed: int = 0
    ) -> None:
        self._source = source
        self._load = load
        self.config = config
        self._rng = random.Random(seed)

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision:
        if not worker_ids:
            raise NoWorkersError("no workers to choose from")
        matches = self._source.find_matches(request.block_hashes)
        num_prefill_blocks = -(-request.num_prompt_tokens // self.config.block_size)
        costs = [
            kv_cost(
                num_prefill_blocks,
                matches.medium_blocks(worker_id),
                self._load.active_decode_blocks(worker_id),
                self.config,
            )
            for worker_id in worker_ids
        ]
        if self.config.temperature > 0:
            chosen = worker_ids[softmax_sample(costs, self.config.temperature, self._rng)]
            reason: DecisionReason = "sampled"
        else:
            lowest = min(costs)
            tied = [
                w for w, c in zip(worker_ids, costs, strict=True) if c - lowest <= _COST_TIE_EPS
            ]
            chosen, reason = self._load.least_loaded(tied), "min-cost"
        return RoutingDecision(
            worker_id=chosen,
            policy=self.name,
            reason=reason,
            worker_costs=dict(zip(worker_ids, costs, strict=True)),
            num_cached_blocks=matches.num_blocks(chosen),
        )


class ApproxPrefixIndex:
    """Owns the router's guess of each worker's cache: prompts it routed there, kept ``ttl_s``.

    For workers that publish no KV events. Time comes from the injected ``clock`` (seconds);
    an entry counts while ``now < routed_at + ttl_s``. No I/O.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._hash_to_worker_expiry: dict[int, dict[str, float]] = {}
        # Same TTL for all: insertion order (refreshed by move_to_end) is expiry order.
        self._expiry_order: OrderedDict[tuple[int, str], float] = OrderedDict()

    def num_entries(self) -> int:
        """(block, worker) pairs routed within the last ``ttl_s``."""
        self._purge(self._clock())
        return len(self._expiry_order)

    def record(self, block_hashes: Sequence[int], worker_id: str) -> None:
        """The prompt with these block hashes was routed to ``worker_id`` now."""
        now = self._clock()
        self._purge(now)
        expires_at = now + self.ttl_s
        for block_hash in block_hashes:
            self._hash_to_worker_expiry.setdefault(block_hash, {})[worker_id] = expires_at
            key = (block_hash, worker_id)
            self._expiry_order[key] = expires_at
            self._expiry_order.move_to_end(key)

    def find_matches(self, block_hashes: Sequence[int]) -> PrefixMatches:
        """Per worker, the leading blocks routed there within ``ttl_s`` (counted as GPU)."""
        self._purge(self._clock())
        matched: dict[str, dict[str, int]] = {}
        active: set[str] = set()
        for pos, block_hash in enumerate(block_hashes):
            holders = self._hash_to_worker_expiry.get(block_hash, {})
            next_active = set(holders) if pos == 0 else active.intersection(holders)
            for worker_id in active - next_active:
                matched[worker_id] = {DEFAULT_MEDIUM: pos}
            active = next_active
            if not active:
                break
        for worker_id in active:
            matched[worker_id] = {DEFAULT_MEDIUM: len(block_hashes)}
        return PrefixMatches(matched)

    def remove_worker(self, worker_id: str) -> None:
        for key in [k for k in self._expiry_order if k[1] == worker_id]:
            self._drop(key)

    def _purge(self, now: float) -> None:
        while self._expiry_order:
            key, expires_at = next(iter(self._expiry_order.items()))
            if expires_at > now:
                return
            self._drop(key)

    def _drop(self, key: tuple[int, str]) -> None:
        block_hash, worker_id = key
        del self._expiry_order[key]
        holders = self._hash_to_worker_expiry[block_hash]
        del holders[worker_id]
        if not holders:
            del self._hash_to_worker_expiry[block_hash]


class ApproxPolicy:
    """The ``kv`` cost over an ``ApproxPrefixIndex`` that learns from this policy's decisions."""

    name: PolicyName = "approx"

    def __init__(
        self,
        load: WorkerLoad,
        config: KVCostConfig,
        ttl_s: float,
        clock: Callable[[], float],
        seed: int = 0,
    ) -> None:
        self.index = ApproxPrefixIndex(ttl_s, clock)
        self._kv = KVPolicy(self.index, load, config, seed)

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision:
        decision = self._kv.choose(request, worker_ids)
        self.index.record(request.block_hashes, decision.worker_id)
        return RoutingDecision(
            worker_id=decision.worker_id,
            policy=self.name,
            reason=decision.reason,
            worker_costs=decision.worker_costs,
            num_cached_blocks=decision.num_cached_blocks,
        )


class RoundRobinPolicy:
    name: PolicyName = "round-robin"

    def __init__(self) -> None:
        self._num_decisions = 0

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision:
        if not worker_ids:
            raise NoWorkersError("no workers to choose from")
        worker_id = worker_ids[self._num_decisions % len(worker_ids)]
        self._num_decisions += 1
        return RoutingDecision(worker_id, self.name, "round-robin")


class RandomPolicy:
    name: PolicyName = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision:
        if not worker_ids:
            raise NoWorkersError("no workers to choose from")
        return RoutingDecision(self._rng.choice(list(worker_ids)), self.name, "random")


class LeastLoadedPolicy:
    name: PolicyName = "least-loaded"

    def __init__(self, load: WorkerLoad) -> None:
        self._load = load

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision:
        return RoutingDecision(self._load.least_loaded(worker_ids), self.name, "least-loaded")


class SessionPolicy:
    """Sticks each session to one worker; owns the session map (LRU, ``max_sessions``)."""

    name: PolicyName = "session"

    def __init__(self, load: WorkerLoad, max_sessions: int = 100_000) -> None:
        self._load = load
        self.max_sessions = max_sessions
        self._session_to_worker: OrderedDict[str, str] = OrderedDict()

    def choose(self, request: RequestView, worker_ids: Sequence[str]) -> RoutingDecision:
        session_id = request.session_id
        if session_id is None:
            return RoutingDecision(self._load.least_loaded(worker_ids), self.name, "no-session")
        sticky = self._session_to_worker.get(session_id)
        if sticky is not None and sticky in worker_ids:
            self._session_to_worker.move_to_end(session_id)
            return RoutingDecision(sticky, self.name, "sticky")
        worker_id = self._load.least_loaded(worker_ids)
        self._session_to_worker[session_id] = worker_id
        self._session_to_worker.move_to_end(session_id)
        if len(self._session_to_worker) > self.max_sessions:
            self._session_to_worker.popitem(last=False)
        reason: DecisionReason = "new-session" if sticky is None else "sticky-worker-gone"
        return RoutingDecision(worker_id, self.name, reason)


def make_policy(
    name: PolicyName,
    load: WorkerLoad,
    config: KVCostConfig,
    indexer: KVIndexer | None = None,
    clock: Callable[[], float] | None = None,
    seed: int = 0,
    approx_ttl_s: float = 120.0,
) -> RoutingPolicy:
    """Build a policy by name; ``kv`` needs the indexer, ``approx`` a clock (seconds)."""
    if name == "kv":
        if indexer is None:
            raise ValueError("the kv policy needs a KVIndexer")
        return KVPolicy(indexer, load, config, seed)
    if name == "approx":
        if clock is None:
            raise ValueError("the approx policy needs a clock")
        return ApproxPolicy(load, config, approx_ttl_s, clock, seed)
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "least-loaded":
        return LeastLoadedPolicy(load)
    if name == "session":
        return SessionPolicy(load)
    raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


def route_request(
    policy: RoutingPolicy, load: WorkerLoad, request: RequestView, worker_ids: Sequence[str]
) -> RoutingDecision:
    """Choose a worker and count the request in its load (cached prefix not as prefill)."""
    decision = policy.choose(request, worker_ids)
    load.add_request(
        request.request_id,
        decision.worker_id,
        request.num_prompt_tokens,
        num_cached_tokens=decision.num_cached_blocks * load.block_size,
    )
    return decision
