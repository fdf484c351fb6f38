"""Trace replay: the real router in front of N mock engines, in virtual time, in one process.

    .venv/bin/strata bench replay --trace ../shared/traces/conversation_trace.jsonl \\
        --workers 8 --router kv --router round-robin --kv-blocks-per-worker 1024

Offline mode is a discrete-event simulation over one heap of ``(time, priority, seq, event)``:
no threads, no sleeps. Each worker is a real ``EngineCore`` (scheduler, KV cache manager with
prefix caching, block pool and its KV events) driven by ``MockModelRunner``'s timing model. Each
engine steps on its own virtual timeline: a step starts when the previous one's modelled
duration ends, or when a request reaches an idle engine. Requests arrive at trace time divided
by ``speedup``, are routed by the real policy (``serving/router/policies.py``) and counted in
its ``WorkerLoad``; the ``kv`` policy's ``KVIndexer`` receives each engine's KV events when the
step that produced them ends. Figures: prefix hit rate from the engines' ``num_cached_tokens``,
the hit rate of one shared LRU cache of the same total capacity (the upper bound), TTFT, ITL,
throughput and per-worker load imbalance. Prefill/decode pools (``prefill_workers``,
``decode_workers``: remote prefill, KV pulls, leases) are ``bench/replay_disagg.py``'s. See
``docs/replay.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import math
import os
import platform
import statistics
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import typer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/replay.py` runs without the repo on the path
    sys.path.insert(0, str(REPO_ROOT))

from bench.replay_disagg import DisaggFlow  # noqa: E402
from bench.replay_tiers import DEFAULT_KV_BYTES_PER_TOKEN, TierFlow  # noqa: E402
from bench.trace import (  # noqa: E402
    PromptBuilder,
    TraceRequest,
    check_hash_coverage,
    jitter_arrivals,
    load_mooncake,
)
from serving.engine.core import EngineCore  # noqa: E402
from serving.engine.kv_offload import KVOnboard  # noqa: E402
from serving.engine.kv_transfer import DEFAULT_LEASE_S, KVPull  # noqa: E402
from serving.engine.outputs import EngineStepResult  # noqa: E402
from serving.engine.request import Request, SamplingParams  # noqa: E402
from serving.engine.scheduler import SchedulerConfig  # noqa: E402
from serving.engine.timing import MockModelRunner, TimingProfile  # noqa: E402
from serving.protocol.kv_events import KVCacheEvent  # noqa: E402
from serving.router.disagg import (  # noqa: E402
    DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
    DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
)
from serving.router.indexer import KVIndexer  # noqa: E402
from serving.router.policies import (  # noqa: E402
    DEFAULT_PREFILL_SCALE,
    DEFAULT_TIER_WEIGHTS,
    KVCostConfig,
    PolicyName,
    RequestView,
    RoutingPolicy,
    WorkerLoad,
    make_policy,
    route_request,
)

DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
_PREFIX_POLICIES = ("kv", "approx")  # policies that read the prompt's block hashes


class ReplayConfig(BaseModel):
    """One replay run, parsed once at the CLI edge. ``extra="forbid"`` at every level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trace: Path = Field(description="Mooncake-format JSONL trace.")
    workers: int = Field(
        default=8, ge=0, description="Aggregated engines (each prefills and decodes)."
    )
    prefill_workers: int = Field(
        default=0, ge=0, description="Prefill-only engines: remote prefill for the others."
    )
    decode_workers: int = Field(
        default=0, ge=0, description="Decode-only engines: routed to like aggregated ones."
    )
    kv_bandwidth_gbps: float = Field(
        default=25.0, gt=0, description="KV pull bandwidth in GB/s (1e9 bytes)."
    )
    max_local_prefill_tokens: int = Field(
        default=DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
        ge=0,
        description="Disaggregation: uncached prompt tokens the decode worker prefills itself.",
    )
    max_local_prefill_fraction: float = Field(
        default=DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
        ge=0,
        le=1,
        description="Disaggregation: ... and at most this share of the prompt.",
    )
    kv_lease_s: float = Field(
        default=DEFAULT_LEASE_S,
        gt=0,
        description="Disaggregation: how long a prefill engine keeps finished KV for a pull.",
    )
    routers: tuple[PolicyName, ...] = Field(default=("kv",), min_length=1)
    engine: Literal["mock"] = "mock"
    mode: Literal["offline", "online"] = "offline"
    kv_blocks_per_worker: int = Field(default=1024, ge=1, description="KV blocks per engine.")
    block_size: int = Field(default=512, ge=1, description="Tokens per hash id and KV block.")
    speedup: float = Field(default=1.0, gt=0, description="Divide trace arrival times by this.")
    limit: int | None = Field(default=None, ge=1, description="Replay the first K requests.")
    arrival_jitter_s: float = Field(
        default=0.0, ge=0, description="Spread arrivals uniformly over this window (trace s)."
    )
    kv_prefill_scale: float = Field(
        default=DEFAULT_PREFILL_SCALE,
        gt=0,
        description="kv/approx cost: weight of uncached prompt blocks.",
    )
    kv_tier_weights: dict[str, float] = Field(
        default_factory=dict, description="kv cost: credit per cached block by medium (CPU, S3)."
    )
    kv_host_blocks_per_worker: int = Field(
        default=0, ge=0, description="KV tiers: G2 (host memory) blocks per engine; 0: none."
    )
    kv_s3_blocks: int = Field(
        default=0, ge=0, description="KV tiers: blocks of one G4 (S3) shared by all; 0: none."
    )
    kv_host_bandwidth_gbps: float = Field(
        default=55.0, gt=0, description="KV tiers: G2 -> device GB/s (pinned, H100 measured)."
    )
    kv_s3_bandwidth_gbps: float = Field(
        default=2.0, gt=0, description="KV tiers: G4 -> device GB/s per worker (assumed)."
    )
    kv_s3_latency_s: float = Field(
        default=0.03, ge=0, description="KV tiers: G4 latency per round of 8 parallel reads."
    )
    kv_offload_min_uses: int = Field(
        default=2, ge=1, description="KV tiers: uses before a block is copied G2 -> G4."
    )
    kv_bytes_per_token: int = Field(
        default=DEFAULT_KV_BYTES_PER_TOKEN, ge=1, description="KV tiers: bytes per token."
    )
    seed: int = 0
    vocab_size: int = Field(default=32_000, ge=2)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    timing_profile: Path | None = None
    url: str | None = Field(default=None, description="Online mode: OpenAI base URL.")
    out: Path | None = None

    @model_validator(mode="after")
    def _check_pools(self) -> ReplayConfig:
        if self.workers + self.decode_workers < 1:
            raise ValueError(
                "no engine can decode: workers (aggregated) + decode_workers must be >= 1"
            )
        if self.mode == "online" and self.is_disaggregated:
            raise ValueError(
                "online mode does not run prefill/decode pools yet: use --mode offline"
            )
        return self

    @property
    def is_disaggregated(self) -> bool:
        return self.prefill_workers + self.decode_workers > 0

    @property
    def num_engines(self) -> int:
        return self.workers + self.prefill_workers + self.decode_workers

    @property
    def has_tiers(self) -> bool:
        return bool(self.kv_host_blocks_per_worker or self.kv_s3_blocks)


# -- the shared-cache upper bound ----------------------------------------------------------------


def shared_cache_hit_rate(
    requests: Sequence[TraceRequest], block_size: int, capacity_blocks: int | None
) -> float:
    """Prefix hit rate of one LRU block cache serving every request in arrival order.

    The bound the routers are measured against: all workers' blocks pooled into one cache
    (``capacity_blocks``; ``None`` = unbounded). Each request hits the leading run of its
    blocks already cached, capped as the engine caps it (at most ``(input_length - 1) //
    block_size`` blocks: one token is always computed), then its full prompt blocks become the
    most recently used, prefix last, so the prefix is evicted last (as the engine frees
    tail-first). Blocks are keyed by the chain of hash ids up to them, so two equal ids behind
    different prefixes are different blocks. No timing: requests never overlap, output blocks
    and in-flight requests take no room, which only favours the shared cache.
    """
    chain_ids: dict[tuple[int, int], int] = {}
    lru: OrderedDict[int, None] = OrderedDict()
    hit_tokens = 0
    prompt_tokens = 0
    for r in requests:
        num_full = min(r.input_length // block_size, len(r.hash_ids))
        max_hit = min((r.input_length - 1) // block_size, num_full)
        keys: list[int] = []
        parent = -1
        for hash_id in r.hash_ids[:num_full]:
            parent = chain_ids.setdefault((parent, hash_id), len(chain_ids))
            keys.append(parent)
        hits = 0
        while hits < max_hit and keys[hits] in lru:
            hits += 1
        hit_tokens += hits * block_size
        prompt_tokens += r.input_length
        for key in reversed(keys):
            lru[key] = None
            lru.move_to_end(key)
        if capacity_blocks is not None:
            while len(lru) > capacity_blocks:
                lru.popitem(last=False)
    return hit_tokens / prompt_tokens if prompt_tokens else 0.0


# -- the offline simulator -------------------------------------------------------------------------


class _ScalarTimingProfile(TimingProfile):
    """``TimingProfile`` with the polynomials evaluated by scalar Horner: the same floats as
    ``numpy.polyval`` (which is also Horner), without its per-call overhead, which is about a
    tenth of a replay's time. Measured points still go through ``numpy.interp``."""

    def prefill_ms(self, num_tokens: int) -> float:
        if num_tokens <= 0 or self.prefill_points:
            return super().prefill_ms(num_tokens)
        return _horner(self.prefill_coeffs_ms, float(num_tokens))

    def decode_ms(self, kv_usage: float) -> float:
        if self.decode_points:
            return super().decode_ms(kv_usage)
        return _horner(self.decode_coeffs_ms, min(max(kv_usage, 0.0), 1.0))

    @classmethod
    def of(cls, profile: TimingProfile | None) -> _ScalarTimingProfile:
        profile = profile or TimingProfile()
        return cls(**{f.name: getattr(profile, f.name) for f in dataclasses.fields(profile)})


def _horner(coeffs: Sequence[float], x: float) -> float:
    y = 0.0
    for c in coeffs:
        y = y * x + c
    return y


# Same-time order: results land, then KV pulls, then arrivals, then steps and lease checks,
# then tier onboards.
_STEP_DONE, _PULL_DONE, _ARRIVAL, _WAKE, _LEASE_CHECK, _ONBOARD_DONE = 0, 1, 2, 3, 4, 5
_ROLE_BOTH, _ROLE_PREFILL, _ROLE_DECODE = "both", "prefill", "decode"


@dataclass(slots=True)
class _Live:
    """One in-flight request's timeline (virtual seconds)."""

    arrival_s: float
    first_token_s: float | None = None
    last_token_s: float = 0.0
    remote: bool = False  # prefilled by a prefill worker (its hit is counted there)


@dataclass
class PolicyResult:
    """What one policy's replay measured; plain values, JSON-ready through ``to_dict``."""

    policy: str
    num_requests: int
    completed: int
    rejected: int
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    router_predicted_cached_tokens: int
    ttft_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    makespan_s: float
    num_preemptions: int
    num_steps: int
    per_worker: dict[str, list[float]]
    sim_wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # Per request id: TTFT in virtual seconds; every inter-token gap. Not in ``to_dict``.
    request_ttft_s: dict[str, float] = field(default_factory=dict, repr=False)
    itl_samples_s: Sequence[float] = field(default_factory=tuple, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def throughput_tok_s(self) -> float:
        return self.output_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    def imbalance(self) -> dict[str, float]:
        """Max/mean and coefficient of variation of prompt tokens and requests per worker."""
        out: dict[str, float] = {}
        for key in ("prompt_tokens", "requests", "busy_s"):
            values = self.per_worker[key]
            mean = statistics.fmean(values)
            out[f"{key}_max_over_mean"] = max(values) / mean if mean else 0.0
            out[f"{key}_cv"] = statistics.pstdev(values) / mean if mean else 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        """Figures only: equal seeds give equal dicts (``sim_wall_s`` is kept apart)."""
        return {
            "policy": self.policy,
            "requests": {
                "total": self.num_requests,
                "completed": self.completed,
                "rejected": self.rejected,
            },
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate": self.hit_rate,
            # Only kv/approx predict a cached prefix; null for the other policies.
            "router_predicted_hit_rate": (
                self.router_predicted_cached_tokens / self.prompt_tokens
                if self.prompt_tokens and self.policy in _PREFIX_POLICIES
                else None
            ),
            "output_tokens": self.output_tokens,
            "ttft_s": self.ttft_s,
            "itl_s": self.itl_s,
            "e2e_s": self.e2e_s,
            "makespan_s": self.makespan_s,
            "throughput_tok_s": self.throughput_tok_s,
            # Share of worker-time spent in steps: near 1.0 means the engines are saturated.
            "busy_fraction": (
                sum(self.per_worker["busy_s"]) / (len(self.per_worker["busy_s"]) * self.makespan_s)
                if self.makespan_s > 0
                else 0.0
            ),
            "imbalance": self.imbalance(),
            "per_worker": self.per_worker,
            "num_preemptions": self.num_preemptions,
            "num_engine_steps": self.num_steps,
            **self.extra,
        }


def _percentiles(samples: Sequence[float], qs: Sequence[int]) -> dict[str, float]:
    if not len(samples):
        return {f"p{q}": math.nan for q in qs}
    values = np.percentile(np.asarray(samples, dtype=np.float64), qs)
    return {f"p{q}": float(v) for q, v in zip(qs, values, strict=True)}


class OfflineReplay:
    """Owns the mock engines, one router (policy, load, index) and the virtual clock; no I/O.

    Never sleeps and never starts a thread: ``run`` pops events off one heap until every
    request has finished. Engines see the virtual clock through the injected ``clock``.

    Engines have roles: ``workers`` aggregated ones (``w0``..., prefill and decode), then
    ``prefill_workers`` (``p0``...: remote prefill only) and ``decode_workers`` (``d0``...).
    Requests are routed among the aggregated and decode engines; with prefill engines present,
    ``serving.router.disagg.decide`` sends long uncached prompts to one of them (chosen by the
    same policy) and the decode engine pulls the KV over a link of ``kv_bandwidth_gbps``. That
    flow is ``bench.replay_disagg.DisaggFlow``'s; it calls back into ``admit``, ``reject``,
    ``count_cached_tokens``, ``wake``, ``wake_if_stalled`` and ``schedule_pull_done``.
    """

    def __init__(
        self,
        requests: Sequence[TraceRequest],
        prompts: PromptBuilder,
        policy_name: PolicyName,
        config: ReplayConfig,
        profile: TimingProfile | None = None,
    ) -> None:
        self.requests = requests
        self.prompts = prompts
        self.policy_name = policy_name
        self.config = config
        self.now = 0.0
        bs = config.block_size
        self.roles = (
            [_ROLE_BOTH] * config.workers
            + [_ROLE_PREFILL] * config.prefill_workers
            + [_ROLE_DECODE] * config.decode_workers
        )
        self.worker_ids = (
            [f"w{i}" for i in range(config.workers)]
            + [f"p{i}" for i in range(config.prefill_workers)]
            + [f"d{i}" for i in range(config.decode_workers)]
        )
        num_engines = len(self.worker_ids)
        self.worker_index = {worker_id: i for i, worker_id in enumerate(self.worker_ids)}
        # Routing targets: every engine that decodes. Prefill engines only serve remote prefill.
        roles = list(zip(self.worker_ids, self.roles, strict=True))
        self.decode_ids = [w for w, role in roles if role != _ROLE_PREFILL]
        self.prefill_ids = [w for w, role in roles if role == _ROLE_PREFILL]
        # KV tiers below each engine's pool (bench/replay_tiers.py), when configured.
        self._tiers = (
            TierFlow(config, _ScalarTimingProfile.of(profile), self._schedule_onboard_done)
            if config.has_tiers
            else None
        )
        self.engines = [self._make_engine(i, profile) for i in range(num_engines)]
        self.load = WorkerLoad(bs)
        # Only kv reads events; the index hashes prompts for approx as well (a pure function).
        self.indexer = KVIndexer(bs) if policy_name == "kv" else None
        self._hasher = self.indexer if self.indexer is not None else KVIndexer(bs)
        if self.indexer is not None:
            for worker_id in self.worker_ids:
                self.indexer.add_worker(worker_id)
        self.policy = self._make_policy()
        # Remote prefill, KV pulls and leases; the prefill engines get a policy of their own.
        self._pd = DisaggFlow(self, self._make_policy() if self.prefill_ids else None)
        self._disagg = config.is_disaggregated
        self._hash_prompts = policy_name in _PREFIX_POLICIES
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self._busy = [False] * num_engines
        # The last step could run nothing until a KV pull lands or a lease goes: stay idle.
        self._stalled = [False] * num_engines
        self._empty_steps = [0] * num_engines
        self._live: dict[str, _Live] = {}
        # Measurements.
        self._ttft = array("d")
        self._itl = array("d")
        self._e2e = array("d")
        self._ttft_by_request: dict[str, float] = {}
        self._worker_prompt_tokens = [0] * num_engines
        self._worker_requests = [0] * num_engines
        self._worker_busy_s = [0.0] * num_engines
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._predicted_cached_tokens = 0
        self._output_tokens = 0
        self._completed = 0
        self._rejected = 0
        self._preemptions = 0
        self._steps = 0
        self._first_arrival_s = math.inf
        self._last_token_s = 0.0

    def _make_engine(self, index: int, profile: TimingProfile | None) -> EngineCore:
        config = self.config
        engine = EngineCore(
            MockModelRunner(
                vocab_size=config.vocab_size,
                num_blocks=config.kv_blocks_per_worker,
                block_size=config.block_size,
                profile=_ScalarTimingProfile.of(profile),
                seed=config.seed + index,
            ),
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=config.kv_blocks_per_worker * config.block_size,
            ),
            enable_prefix_caching=True,
            kv_lease_s=config.kv_lease_s,
            clock=self._clock,
        )
        if self._tiers is not None:
            self._tiers.attach(engine)
        return engine

    def _make_policy(self) -> RoutingPolicy:
        return make_policy(
            self.policy_name,
            self.load,
            KVCostConfig(
                block_size=self.config.block_size,
                prefill_scale=self.config.kv_prefill_scale,
                tier_weights={**DEFAULT_TIER_WEIGHTS, **self.config.kv_tier_weights},
            ),
            indexer=self.indexer,
            clock=self._clock,
            seed=self.config.seed,
        )

    def _clock(self) -> float:
        return self.now

    def _push(self, time_s: float, priority: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time_s, priority, self._seq, priority, payload))

    def run(self) -> PolicyResult:
        started = time.perf_counter()
        for r in self.requests:
            self._push(r.arrival_s / self.config.speedup, _ARRIVAL, r)
        handlers: dict[int, Callable[[Any], None]] = {
            _STEP_DONE: self._on_step_done,
            _PULL_DONE: self._pd.on_pull_done,
            _ARRIVAL: self._on_arrival,
            _WAKE: self._start_step,
            _LEASE_CHECK: self._pd.expire_leases,
            _ONBOARD_DONE: self._on_onboard_done,
        }
        heap = self._heap
        while heap:
            time_s, _, _, kind, payload = heapq.heappop(heap)
            self.now = time_s
            handlers[kind](payload)
        if self._live:
            raise RuntimeError(f"{len(self._live)} requests never finished")
        return self._result(time.perf_counter() - started)

    # -- events --------------------------------------------------------------------------------

    def _on_arrival(self, r: TraceRequest) -> None:
        request_id = str(r.index)
        prompt = self.prompts.prompt_token_ids(r)
        hashes = self._hasher.hash_request(prompt) if self._hash_prompts else ()
        view = RequestView(request_id, len(prompt), hashes)
        decision = route_request(self.policy, self.load, view, self.decode_ids)
        worker = self.worker_index[decision.worker_id]
        self._first_arrival_s = min(self._first_arrival_s, self.now)
        num_cached_blocks = decision.num_cached_blocks
        if self._disagg and self._pd.try_remote_prefill(
            r, prompt, hashes, worker, num_cached_blocks
        ):
            return
        request = Request(
            request_id,
            prompt,
            SamplingParams(max_tokens=r.output_length, ignore_eos=True),
            eos_token_id=None,
            arrival_time_s=self.now,
        )
        try:
            self.engines[worker].add_request(request)
        except ValueError:
            self.reject(request_id)
            return
        self.admit(request_id, len(prompt), num_cached_blocks, computed_on=worker, served_on=worker)

    # -- bookkeeping (the P/D flow calls these too) --------------------------------------------

    def admit(
        self,
        request_id: str,
        num_prompt_tokens: int,
        num_cached_blocks: int,
        computed_on: int,
        served_on: int,
        remote: bool = False,
    ) -> None:
        """An engine accepted the request: count it, its prompt where it is computed and the
        request where its tokens are served, then step the computing engine."""
        bs = self.config.block_size
        num_hit_cap = (num_prompt_tokens - 1) // bs
        self._predicted_cached_tokens += min(num_cached_blocks, num_hit_cap) * bs
        self._live[request_id] = _Live(self.now, remote=remote)
        self._prompt_tokens += num_prompt_tokens
        self._worker_prompt_tokens[computed_on] += num_prompt_tokens
        self._worker_requests[served_on] += 1
        self.wake(computed_on)

    def reject(self, request_id: str) -> None:
        """No engine can take the request: it leaves the load and counts as rejected."""
        self.load.finish_request(request_id)
        self._live.pop(request_id, None)
        self._rejected += 1

    def count_cached_tokens(self, num_tokens: int) -> None:
        """Prompt tokens the engine that computed a prompt had cached (the hit rate's)."""
        self._cached_tokens += num_tokens

    def schedule_pull_done(self, time_s: float, payload: tuple[int, int, KVPull]) -> None:
        self._push(time_s, _PULL_DONE, payload)

    def _schedule_onboard_done(self, time_s: float, onboard: KVOnboard, worker: int) -> None:
        self._push(time_s, _ONBOARD_DONE, (worker, onboard))

    def _on_onboard_done(self, payload: tuple[int, KVOnboard]) -> None:
        worker, onboard = payload
        assert self._tiers is not None
        self._tiers.on_onboard_done(self.engines[worker], onboard)
        self.wake(worker)

    def wake(self, worker: int) -> None:
        """Something changed for ``worker`` (a request, a landed pull, freed blocks): step it."""
        self._stalled[worker] = False
        if not self._busy[worker]:
            self._busy[worker] = True  # a wake-up is pending; later arrivals now join it
            self._push(self.now, _WAKE, worker)

    def wake_if_stalled(self, worker: int) -> None:
        """Blocks were freed: step ``worker`` if it idles waiting for them."""
        if self._stalled[worker]:
            self.wake(worker)

    # -- steps ---------------------------------------------------------------------------------

    def _start_step(self, worker: int) -> None:
        engine = self.engines[worker]
        if self._disagg and engine.scheduler.leases:
            self._pd.expire_leases(worker)
        result = engine.step()
        events = engine.take_kv_events()
        duration = result.step_duration_s or 0.0
        self._steps += 1
        if result.kv_pulls:
            self._pd.start_pulls(worker, result.kv_pulls)
        if result.kv_onboards:
            assert self._tiers is not None
            self._tiers.start_onboards(worker, result.kv_onboards, self.now + duration)
        if duration == 0.0 and not (result.outputs or result.kv_pulls or result.kv_onboards):
            sched = engine.scheduler
            if sched.waiting_for_kv or sched.leases:
                # Blocks are held by pulls in flight or by leases: idle until one ends.
                self._stalled[worker] = True
                expiry = sched.next_lease_expiry_s()
                if expiry is not None:
                    self._push(expiry, _LEASE_CHECK, worker)
            else:
                # Only a step that preempted everything it planned is empty: the next one runs.
                self._empty_steps[worker] += 1
                if self._empty_steps[worker] > 3:
                    raise RuntimeError(f"engine {self.worker_ids[worker]} cannot schedule")
        else:
            self._empty_steps[worker] = 0
        self._worker_busy_s[worker] += duration
        self._push(self.now + duration, _STEP_DONE, (worker, result, events))

    def _on_step_done(self, payload: tuple[int, EngineStepResult, list[KVCacheEvent]]) -> None:
        worker, result, events = payload
        now = self.now
        if result.tier_jobs:
            assert self._tiers is not None
            self._tiers.finish_stores(self.engines[worker], result.tier_jobs)
            events = [*events, *self.engines[worker].take_kv_events()]  # their BlockStored
        if self.indexer is not None and events:
            self.indexer.apply_events(self.worker_ids[worker], events)
        self._preemptions += result.stats.num_preemptions
        if self.roles[worker] == _ROLE_PREFILL:
            for out in result.outputs:
                self._pd.on_prefill_output(worker, out)
        else:
            load = self.load
            for out in result.outputs:
                rid = out.request_id
                live = self._live[rid]
                if live.first_token_s is None:
                    live.first_token_s = now
                    ttft = now - live.arrival_s
                    self._ttft.append(ttft)
                    self._ttft_by_request[rid] = ttft
                    if live.remote:
                        self._pd.stats.decode_hit_tokens += out.num_cached_tokens
                    else:
                        self._cached_tokens += out.num_cached_tokens
                    load.mark_prefill_done(rid)
                else:
                    self._itl.append(now - live.last_token_s)
                live.last_token_s = now
                num_new = len(out.new_token_ids)
                self._output_tokens += num_new
                load.add_output_tokens(rid, num_new)
                if out.finished:
                    load.finish_request(rid)
                    self._e2e.append(now - live.arrival_s)
                    self._completed += 1
                    self._last_token_s = max(self._last_token_s, now)
                    del self._live[rid]
        if self.engines[worker].has_unfinished_requests() and not self._stalled[worker]:
            self._start_step(worker)
        else:
            self._busy[worker] = False

    # -- results -------------------------------------------------------------------------------

    def _result(self, wall_s: float) -> PolicyResult:
        makespan = self._last_token_s - self._first_arrival_s if self._completed else 0.0
        return PolicyResult(
            policy=self.policy_name,
            num_requests=len(self.requests),
            completed=self._completed,
            rejected=self._rejected,
            prompt_tokens=self._prompt_tokens,
            cached_tokens=self._cached_tokens,
            output_tokens=self._output_tokens,
            router_predicted_cached_tokens=(
                self._predicted_cached_tokens if self.policy_name in _PREFIX_POLICIES else 0
            ),
            ttft_s=_percentiles(self._ttft, (50, 90, 99)),
            itl_s=_percentiles(self._itl, (50, 90, 99)),
            e2e_s=_percentiles(self._e2e, (50, 99)),
            makespan_s=makespan,
            num_preemptions=self._preemptions,
            num_steps=self._steps,
            per_worker={
                "prompt_tokens": [float(v) for v in self._worker_prompt_tokens],
                "requests": [float(v) for v in self._worker_requests],
                "busy_s": list(self._worker_busy_s),
            },
            sim_wall_s=wall_s,
            extra={
                **(self._pd.figures(self._ttft_by_request, _percentiles) if self._disagg else {}),
                **(self._tiers.to_dict() if self._tiers is not None else {}),
            },
            request_ttft_s=self._ttft_by_request,
            itl_samples_s=self._itl,
        )


# -- one command -----------------------------------------------------------------------------------


def load_requests(config: ReplayConfig) -> list[TraceRequest]:
    requests = load_mooncake(config.trace, config.limit)
    return jitter_arrivals(requests, config.arrival_jitter_s, config.seed)


def run_offline(
    config: ReplayConfig,
    requests: Sequence[TraceRequest] | None = None,
    on_policy_done: Callable[[PolicyResult], None] | None = None,
) -> dict[str, Any]:
    """Replay the trace once per router policy in virtual time; returns the JSON report.

    ``report["runtime"]`` holds wall-clock figures (they differ run to run); everything else
    is a function of the config and the trace.
    """
    if requests is None:
        requests = load_requests(config)
    profile = TimingProfile.from_json(config.timing_profile) if config.timing_profile else None
    prompts = PromptBuilder(config.block_size, config.vocab_size, config.seed)
    report, shared = _report_head(config, requests)
    for name in config.routers:
        result = OfflineReplay(requests, prompts, name, config, profile).run()
        figures = result.to_dict()
        figures["hit_rate_of_shared_bound"] = result.hit_rate / shared if shared else 0.0
        report["policies"][name] = figures
        report["runtime"]["policies_s"][name] = result.sim_wall_s
        if on_policy_done is not None:
            on_policy_done(result)
    return report


def run_online(config: ReplayConfig, requests: Sequence[TraceRequest] | None = None) -> dict:
    """Replay the trace over HTTP against ``config.url`` (an OpenAI base URL ending in /v1).

    The endpoint routes with whatever policy it was started with; the report's column is named
    after ``config.routers[0]``. Figures are wall-clock measurements, not reproducible.
    """
    from bench.load import replay_online, summarize

    if config.url is None:
        raise ValueError("online mode needs the endpoint's base URL (--url)")
    if requests is None:
        requests = load_requests(config)
    prompts = PromptBuilder(config.block_size, config.vocab_size, config.seed)
    report, shared = _report_head(config, requests)
    started = time.perf_counter()
    results = asyncio.run(replay_online(config.url, requests, prompts, speedup=config.speedup))
    name = config.routers[0]
    figures = summarize(results, name)
    figures["hit_rate_of_shared_bound"] = figures["hit_rate"] / shared if shared else 0.0
    report["policies"][name] = figures
    report["runtime"]["policies_s"][name] = time.perf_counter() - started
    return report


def run_online_managed(config: ReplayConfig, model_dir: Path) -> dict:
    """Online mode without ``--url``: for each policy, start ``strata serve`` (mock workers
    with this replay's KV size, block size and speedup), replay over HTTP, stop it."""
    import signal
    import subprocess

    from serving.netutil import free_port, wait_healthy

    requests = load_requests(config)
    report: dict[str, Any] | None = None
    for policy in config.routers:
        port = free_port()
        cmd = [
            sys.executable, "-m", "workflows.cli", "serve", "--model", str(model_dir),
            "--workers", str(config.workers), "--engine", "mock", "--router", policy,
            "--port", str(port), "--block-size", str(config.block_size),
            "--kv-prefill-scale", str(config.kv_prefill_scale), "--log-level", "warning",
            f"--worker-arg=--num-blocks={config.kv_blocks_per_worker}",
            f"--worker-arg=--max-model-len={config.kv_blocks_per_worker * config.block_size}",
            f"--worker-arg=--speedup={config.speedup}",
            f"--worker-arg=--max-num-seqs={config.max_num_seqs}",
            f"--worker-arg=--max-num-batched-tokens={config.max_num_batched_tokens}",
        ]  # fmt: skip
        serve = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, serve, timeout_s=300)
            one = config.model_copy(update={"url": f"{url}/v1", "routers": (policy,)})
            result = run_online(one, requests)
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        if report is None:
            report = result
        else:
            report["policies"].update(result["policies"])
            report["runtime"]["policies_s"].update(result["runtime"]["policies_s"])
    assert report is not None
    report["config"]["routers"] = list(config.routers)
    return report


def _report_head(
    config: ReplayConfig, requests: Sequence[TraceRequest]
) -> tuple[dict[str, Any], float]:
    """The report without policies: config, trace figures and the shared-cache bound."""
    started = time.perf_counter()
    capacity = config.num_engines * config.kv_blocks_per_worker
    if config.has_tiers:  # the bound holds every tier's blocks
        capacity += config.num_engines * config.kv_host_blocks_per_worker + config.kv_s3_blocks
    shared = shared_cache_hit_rate(requests, config.block_size, capacity)
    unbounded = shared_cache_hit_rate(requests, config.block_size, None)
    span_s = (requests[-1].arrival_s - requests[0].arrival_s) if requests else 0.0
    report: dict[str, Any] = {
        "config": config.model_dump(mode="json", exclude={"out"}),
        "trace": {
            "requests": len(requests),
            "prompt_tokens": sum(r.input_length for r in requests),
            "output_tokens": sum(r.output_length for r in requests),
            "arrival_span_s": span_s / config.speedup,
            "hash_coverage_mismatches": check_hash_coverage(requests, config.block_size),
        },
        "shared_cache": {
            "capacity_blocks": capacity,
            "hit_rate": shared,
            "unbounded_hit_rate": unbounded,
            "model": "one LRU over hash-id chains, arrival order, no timing",
        },
        "policies": {},
        "runtime": {
            "shared_cache_s": time.perf_counter() - started,
            "policies_s": {},
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
            f"python {platform.python_version()}",
        },
    }
    return report, shared


def default_out_path(config: ReplayConfig) -> Path:
    routers = "-".join(config.routers)
    pools = f"w{config.workers}"
    if config.is_disaggregated:
        pools += f"-p{config.prefill_workers}-d{config.decode_workers}"
    return DEFAULT_RESULTS_DIR / f"replay-{config.mode}-{routers}-{pools}.json"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The report as one rich table: a column per policy, a row per figure."""
    console = console or Console()
    cfg, shared, policies = report["config"], report["shared_cache"], report["policies"]
    workers = f"{cfg['workers']} workers"
    if cfg.get("prefill_workers") or cfg.get("decode_workers"):
        workers = (
            f"{cfg['workers']} aggregated + {cfg['prefill_workers']} prefill + "
            f"{cfg['decode_workers']} decode workers (KV link {cfg['kv_bandwidth_gbps']:g} GB/s)"
        )
    table = Table(
        title=(
            f"{Path(cfg['trace']).name}: {report['trace']['requests']} requests, "
            f"{workers} x {cfg['kv_blocks_per_worker']} KV blocks of "
            f"{cfg['block_size']} tokens, speedup {cfg['speedup']:g}, {cfg['mode']}"
        ),
        caption=(
            f"shared-cache bound (one LRU of {shared['capacity_blocks']} blocks): "
            f"{shared['hit_rate']:.1%}; unbounded cache: {shared['unbounded_hit_rate']:.1%}"
        ),
    )
    table.add_column("")
    for name in policies:
        table.add_column(name, justify="right")
    rows = _ROWS
    if any("disagg_decisions" in res for res in policies.values()):
        rows = _ROWS + _DISAGG_ROWS
    if any("kv_tiers" in res for res in policies.values()):
        rows = rows + _TIER_ROWS
    for label, cell in rows:
        table.add_row(label, *(cell(res) for res in policies.values()))
    console.print(table)
    wall = report["runtime"]["policies_s"]
    console.print(
        "simulated in " + ", ".join(f"{name} {s:.0f} s" for name, s in wall.items()),
        style="dim",
    )


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 1e3:.1f}" if value < 1 else f"{value * 1e3:.0f}"


def _cell(fmt: str, *path: str) -> Callable[[dict[str, Any]], str]:
    """Format ``r[path[0]][path[1]]...`` with ``fmt``; "-" where the figure is absent."""

    def cell(r: dict[str, Any]) -> str:
        value: Any = r
        for key in path:
            if not isinstance(value, dict) or value.get(key) is None:
                return "-"
            value = value[key]
        return _ms(value) if fmt == "ms" else format(value, fmt)

    return cell


_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("prefix hit rate", _cell(".1%", "hit_rate")),
    ("  of shared-cache bound", _cell(".0%", "hit_rate_of_shared_bound")),
    ("  router-predicted", _cell(".1%", "router_predicted_hit_rate")),
    ("TTFT p50 ms", _cell("ms", "ttft_s", "p50")),
    ("TTFT p90 ms", _cell("ms", "ttft_s", "p90")),
    ("TTFT p99 ms", _cell("ms", "ttft_s", "p99")),
    ("ITL p50 ms", _cell("ms", "itl_s", "p50")),
    ("ITL p99 ms", _cell("ms", "itl_s", "p99")),
    ("throughput out tok/s", _cell(".0f", "throughput_tok_s")),
    ("engine busy fraction", _cell(".2f", "busy_fraction")),
    ("prompt tokens max/mean", _cell(".2f", "imbalance", "prompt_tokens_max_over_mean")),
    ("prompt tokens CV", _cell(".3f", "imbalance", "prompt_tokens_cv")),
    ("busy time max/mean", _cell(".2f", "imbalance", "busy_s_max_over_mean")),
    ("completed", _cell("d", "requests", "completed")),
    ("rejected / failed", _cell("d", "requests", "rejected")),
    ("preemptions", _cell("d", "num_preemptions")),
]


def _decisions_cell(r: dict[str, Any]) -> str:
    decisions = r.get("disagg_decisions") or {}
    return ", ".join(f"{name} {count}" for name, count in decisions.items()) or "-"


_DISAGG_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("prefill decisions", _decisions_cell),
    ("TTFT remote p50 ms", _cell("ms", "ttft_s_by_decision", "remote", "p50")),
    ("TTFT remote p99 ms", _cell("ms", "ttft_s_by_decision", "remote", "p99")),
    ("KV pulls", _cell("d", "kv_transfer", "pulls")),
    ("KV pulled GB", lambda r: f"{r['kv_transfer']['bytes'] / 1e9:.2f}"),
    ("KV pull p50 ms", _cell("ms", "kv_transfer", "time_s", "p50")),
    ("KV pull p99 ms", _cell("ms", "kv_transfer", "time_s", "p99")),
    ("KV pulls failed", _cell("d", "kv_transfer", "failed")),
    (
        "leases expired / at end",
        lambda r: f"{r['leases_expired']} / {r['leases_outstanding_at_end']}",
    ),
]

_TIER_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("tokens onboarded from G2", _cell("d", "kv_tiers", "onboarded_tokens", "G2")),
    ("tokens onboarded from G4", _cell("d", "kv_tiers", "onboarded_tokens", "G4")),
    ("cost check: onboard", _cell("d", "kv_tiers", "cost_check", "onboard")),
    ("cost check: recompute", _cell("d", "kv_tiers", "cost_check", "recompute")),
    ("onboard p50 ms", _cell("ms", "kv_tiers", "onboard_s_p50")),
]


if __name__ == "__main__":
    from workflows.bench_cli import replay as _replay_command

    typer.run(_replay_command)
