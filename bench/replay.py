"""Trace replay: the real router in front of N mock engines, in virtual time, in one process.

    .venv/bin/strata bench replay --trace conversation_trace.jsonl \\
        --workers 8 --router kv --router round-robin --kv-blocks-per-worker 1024

(the trace: Mooncake FAST'25 ``conversation_trace.jsonl``, github.com/kvcache-ai/Mooncake,
``FAST25-release/traces``; any Mooncake-format JSONL file works).

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
``decode_workers``: remote prefill, KV pulls, leases) are ``bench/replay_disagg.py``'s. The
config is ``bench/replay_config.py``'s, the report and its table ``bench/replay_report.py``'s,
online mode ``bench/replay_online.py``'s. See ``docs/replay.md``.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/replay.py` runs without the repo on the path
    sys.path.insert(0, str(REPO_ROOT))

from bench.replay_config import PREFIX_POLICIES, ReplayConfig  # noqa: E402
from bench.replay_disagg import DisaggFlow  # noqa: E402
from bench.replay_report import report_head  # noqa: E402
from bench.replay_result import PolicyResult, percentiles  # noqa: E402
from bench.replay_tiers import TierFlow  # noqa: E402
from bench.replay_timing import ScalarTimingProfile  # noqa: E402
from bench.trace import PromptBuilder, TraceRequest, jitter_arrivals, load_trace  # noqa: E402
from serving.engine.core import EngineCore  # noqa: E402
from serving.engine.kv_offload import KVOnboard  # noqa: E402
from serving.engine.kv_transfer import KVPull  # noqa: E402
from serving.engine.outputs import EngineStepResult  # noqa: E402
from serving.engine.request import Request, SamplingParams  # noqa: E402
from serving.engine.scheduler import SchedulerConfig  # noqa: E402
from serving.engine.timing import MockModelRunner, TimingProfile  # noqa: E402
from serving.protocol.kv_events import KVCacheEvent  # noqa: E402
from serving.router.indexer import KVIndexer  # noqa: E402
from serving.router.policies import (  # noqa: E402
    DEFAULT_TIER_WEIGHTS,
    KVCostConfig,
    PolicyName,
    RequestView,
    RoutingPolicy,
    WorkerLoad,
    make_policy,
    route_request,
)

# -- the offline simulator -------------------------------------------------------------------------


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
            TierFlow(config, ScalarTimingProfile.of(profile), self._schedule_onboard_done)
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
        self._hash_prompts = policy_name in PREFIX_POLICIES
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
                profile=ScalarTimingProfile.of(profile),
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
                self._predicted_cached_tokens if self.policy_name in PREFIX_POLICIES else 0
            ),
            ttft_s=percentiles(self._ttft, (50, 90, 99)),
            itl_s=percentiles(self._itl, (50, 90, 99)),
            e2e_s=percentiles(self._e2e, (50, 99)),
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
                **(self._pd.figures(self._ttft_by_request, percentiles) if self._disagg else {}),
                **(self._tiers.to_dict() if self._tiers is not None else {}),
            },
            request_ttft_s=self._ttft_by_request,
            itl_samples_s=self._itl,
        )


# -- one command -----------------------------------------------------------------------------------


def load_requests(config: ReplayConfig) -> list[TraceRequest]:
    requests = load_trace(config.trace, config.limit)
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
    report, shared = report_head(config, requests)
    for name in config.routers:
        result = OfflineReplay(requests, prompts, name, config, profile).run()
        figures = result.to_dict()
        figures["hit_rate_of_shared_bound"] = result.hit_rate / shared if shared else 0.0
        report["policies"][name] = figures
        report["runtime"]["policies_s"][name] = result.sim_wall_s
        if on_policy_done is not None:
            on_policy_done(result)
    return report


if __name__ == "__main__":
    from workflows.bench_cli import replay as _replay_command

    typer.run(_replay_command)
