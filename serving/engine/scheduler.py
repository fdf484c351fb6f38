"""Continuous batching with chunked prefill and preemption by recompute. No I/O, no torch."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from serving.engine.block_pool import KVCacheBlock
from serving.engine.kv_cache_manager import KVCacheBlocks, KVCacheManager, cdiv
from serving.engine.kv_offload import KVOnboard, TierHook, TierLookupResult
from serving.engine.kv_transfer import (
    DEFAULT_LEASE_S,
    KVLease,
    KVPull,
    lease_params,
    wants_remote_decode,
)
from serving.engine.outputs import EngineCoreOutput, RequestTimes, SchedulerStats
from serving.engine.request import Request, RequestStatus
from serving.engine.scheduler_output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    # Prefill side of disaggregation: how long finished requests' blocks wait for a pull.
    kv_lease_s: float = DEFAULT_LEASE_S


@dataclass(slots=True)
class _PendingPull:
    request: Request
    num_local_hit_tokens: int
    # Tokens with KV once the pull landed (== num_local_hit_tokens for an empty pull).
    num_computed_after_pull: int


@dataclass(slots=True)
class _HeldBlocks:
    lease: KVLease
    blocks: list[KVCacheBlock]


class Scheduler:
    """Decides, each step, which requests advance by how many tokens.

    Owns the waiting queue, the running list and per-request progress; never touches tensors.
    There is no separate prefill or decode phase: a request simply has
    ``num_tokens - num_computed_tokens`` tokens left to compute, and each step gives some of
    them a share of the token budget.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.times: dict[str, RequestTimes] = {}
        self._finished_req_ids: set[str] = set()
        self._num_preemptions = 0
        # Decode side: requests whose blocks are allocated and being filled by a pull.
        self.waiting_for_kv: dict[str, _PendingPull] = {}
        # Prefill side: finished requests' blocks kept for a decode worker, by request id.
        self.leases: dict[str, _HeldBlocks] = {}
        # KV tiers below the device (serving.kvcache), set by EngineCore.attach_tiers.
        self.tiers: TierHook | None = None

    # -- admission ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.times[request.request_id] = RequestTimes(arrival_s=self.clock())
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[str]:
        """Finish (abort) requests from outside; returns the ids that were still live."""
        done: list[str] = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                # A pull may be writing into its blocks: they are freed in finish_kv_pull.
                request.status = status
                done.append(req_id)
                continue
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request)
            done.append(req_id)
        return done

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.waiting_for_kv)

    def has_unfinished_requests(self) -> bool:
        """Whether a step has work to do (requests waiting for a pull do not count)."""
        return bool(self.waiting or self.running)

    # -- disaggregation ----------------------------------------------------------------------

    def finish_kv_pull(self, request_id: str, *, succeeded: bool) -> bool:
        """A pull planned by ``schedule`` ended; the request can run now.

        On success the prompt's KV is local except the last token, which is recomputed (its
        logits sample the first output token); an empty pull (nothing to fetch, or a remote
        side that could not cover the prompt) leaves the local prefix-cache hit. On failure the
        request prefills locally from its own prefix-cache hit, in the blocks it already holds.
        Returns False for an unknown id. A request aborted during the pull is freed here.
        """
        pending = self.waiting_for_kv.pop(request_id, None)
        if pending is None:
            return False
        request = pending.request
        if request.is_finished:
            self._free_request(request)
            return True
        if succeeded:
            request.num_computed_tokens = pending.num_computed_after_pull
        else:
            request.num_computed_tokens = pending.num_local_hit_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def finish_kv_onboard(self, request_id: str, num_loaded_tokens: int) -> bool:
        """An onboard planned by ``schedule`` ended with ``num_loaded_tokens`` of its tokens in
        place (fewer than planned when a block failed its checks: the rest is recomputed).
        Returns False for an unknown id; a request aborted meanwhile is freed here."""
        pending = self.waiting_for_kv.pop(request_id, None)
        if pending is None:
            return False
        request = pending.request
        if request.is_finished:
            self._free_request(request)
            return True
        request.num_computed_tokens = pending.num_local_hit_tokens + num_loaded_tokens
        if request.num_cached_tokens is None:
            request.num_cached_tokens = request.num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def release_lease(self, request_id: str) -> bool:
        """The decode worker has the blocks (or gave up): drop the lease. False if unknown."""
        held = self.leases.pop(request_id, None)
        if held is None:
            return False
        self.kv.release(held.blocks)
        return True

    def renew_lease(self, request_id: str, lease_s: float | None = None) -> KVLease | None:
        """Push a lease's expiry to now + ``lease_s`` (default: the configured lease)."""
        held = self.leases.get(request_id)
        if held is None:
            return None
        held.lease.expires_at_s = self.clock() + (lease_s or self.config.kv_lease_s)
        return held.lease

    def expire_leases(self) -> list[str]:
        """Release every lease past its expiry; returns their request ids."""
        now = self.clock()
        expired = [rid for rid, h in self.leases.items() if h.lease.expires_at_s <= now]
        for request_id in expired:
            self.release_lease(request_id)
        return expired

    def next_lease_expiry_s(self) -> float | None:
        """When the earliest lease runs out (an idle owner's next wake-up), None if none."""
        return min((h.lease.expires_at_s for h in self.leases.values()), default=None)

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step.

        NOTE: running requests go first, in order; when the pool runs dry the request at the
        end of the running list is preempted (its blocks freed, its progress reset to zero, it
        returns to the front of the waiting queue) until the current one fits. Waiting requests
        are admitted only in steps without preemption, while budget, ``max_num_seqs`` and
        blocks last. Each request's share is ``min(tokens left, budget left)``, which is
        chunked prefill.
        """
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: set[str] = set()
        now = self.clock()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            else:
                seqs.append(self._make_seq(request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nothing after it can run either

        pulls: list[KVPull] = []
        onboards: list[KVOnboard] = []
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) + len(self.waiting_for_kv) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            if request.remote_prefill is not None:
                pull = self._plan_pull(request, hits, num_hit_tokens)
                if pull is None:
                    break
                pulls.append(pull)
                self.times[request.request_id].first_scheduled_s = now
                continue
            lookup = None
            if self.tiers is not None:
                max_hit_blocks = (request.num_tokens - 1) // self.kv.block_size
                lookup = self.tiers.lookup(request.block_hashes[:max_hit_blocks], len(hits))
                if lookup.num_onboard_blocks:
                    onboard = self._plan_onboard(request, hits, num_hit_tokens, lookup)
                    if onboard is None:
                        break
                    onboards.append(onboard)
                    times = self.times[request.request_id]
                    if times.first_scheduled_s is None:
                        times.first_scheduled_s = now
                    continue
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            if lookup is not None:
                assert self.tiers is not None
                self.tiers.commit(lookup, None)
            if request.num_preemptions == 0:
                # As vLLM counts them: a victim re-finding its own blocks is not a cache hit.
                self.kv.record_prefix_lookup(request.num_tokens, num_hit_tokens)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            times = self.times[request.request_id]
            if times.first_scheduled_s is None:
                times.first_scheduled_s = now
            seqs.append(self._make_seq(request, num_new))
            budget -= num_new

        finished, self._finished_req_ids = self._finished_req_ids, set()
        return SchedulerOutput(
            seqs=seqs,
            finished_req_ids=finished,
            preempted_req_ids=preempted,
            kv_usage=self.kv.usage,
            kv_pulls=pulls,
            kv_onboards=onboards,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance progress by what ran, append sampled tokens, and finish stopped requests."""
        outputs: list[EngineCoreOutput] = []
        now = self.clock()
        for seq in scheduler_output.seqs:
            request = self.requests.get(seq.req_id)
            if request is None or request.is_finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += seq.num_tokens
            token_id = runner_output.sampled_token_ids.get(seq.req_id)
            if token_id is None:
                continue  # a prefill chunk that does not reach the end of the prompt yet
            request.output_token_ids.append(token_id)
            times = self.times[request.request_id]
            if times.first_token_s is None:
                times.first_token_s = now
            times.last_token_s = now
            self._check_stop(request, token_id)
            logprobs = runner_output.logprobs.get(seq.req_id)
            outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[token_id],
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=request.num_cached_tokens or 0,
                    new_logprobs=[logprobs] if logprobs is not None else [],
                    finish_reason=RequestStatus.finish_reason(request.status),
                    stop_reason=request.stop_reason,
                    num_output_tokens=request.num_output_tokens,
                    times=times,
                    kv_transfer_params=request.kv_transfer_params,
                )
            )
            if request.is_finished:
                self.running.remove(request)
                if request.status == RequestStatus.FINISHED_LENGTH_CAPPED and wants_remote_decode(
                    request.kv_transfer_params
                ):
                    outputs[-1].kv_transfer_params = self._lease(request)
                else:
                    self._free_request(request)
        return outputs

    def make_stats(self) -> SchedulerStats:
        prefix = self.kv.take_prefix_cache_stats()
        num_preemptions, self._num_preemptions = self._num_preemptions, 0
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=num_preemptions,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _make_seq(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(
            req_id=request.request_id,
            token_ids=request.token_slice(start, start + num_new),
            start_pos=start,
            block_ids=self.kv.get_block_ids(request.request_id),
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            num_output_tokens=request.num_output_tokens,
        )

    def _plan_pull(
        self, request: Request, hits: KVCacheBlocks, num_hit_tokens: int
    ) -> KVPull | None:
        """Allocate a remote-prefill request's prompt blocks and say which to pull.

        The KV of prompt tokens ``[0, n-1)`` is needed (the last one is recomputed); the local
        prefix cache covers ``num_hit_tokens`` of them, the prefill worker's blocks the rest.
        None when the pool cannot hold the prompt now (the request keeps waiting).
        """
        source = request.remote_prefill
        assert source is not None
        num_tokens = request.num_tokens
        if (
            self.kv.allocate_slots(request, num_tokens - num_hit_tokens, hits, cache_blocks=False)
            is None
        ):
            return None
        self.waiting.popleft()
        request.remote_prefill = None  # one attempt: a preempted request recomputes locally
        if request.num_preemptions == 0:
            self.kv.record_prefix_lookup(num_tokens, num_hit_tokens)
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_hit_tokens
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS

        block_size = self.kv.block_size
        first_block = num_hit_tokens // block_size
        end_block = cdiv(num_tokens - 1, block_size)
        local_ids = self.kv.get_block_ids(request.request_id)
        if len(source.block_ids) < end_block or request.num_output_tokens:
            first_block = end_block = 0  # the remote side cannot cover the prompt: prefill here
        first_token = first_block * block_size
        num_pulled_tokens = max(min(end_block * block_size, num_tokens - 1) - first_token, 0)
        computed_after = first_token + num_pulled_tokens if num_pulled_tokens else num_hit_tokens
        self.waiting_for_kv[request.request_id] = _PendingPull(
            request, num_hit_tokens, computed_after
        )
        return KVPull(
            request_id=request.request_id,
            source=source,
            remote_block_ids=source.block_ids[first_block:end_block],
            local_block_ids=tuple(local_ids[first_block:end_block]),
            first_token=first_token,
            num_tokens=num_pulled_tokens,
        )

    def _plan_onboard(
        self, request: Request, hits: KVCacheBlocks, num_hit_tokens: int, lookup: TierLookupResult
    ) -> KVOnboard | None:
        """Give a request blocks for its prefix found in lower tiers; it waits for the copy.

        Only the onboarded blocks are allocated now (chunked prefill allocates the rest once
        it runs); they stay unindexed until they count as computed. None: no room now.
        """
        assert self.tiers is not None
        num_blocks = lookup.num_onboard_blocks
        block_size = self.kv.block_size
        first_block = num_hit_tokens // block_size
        computed_after = (first_block + num_blocks) * block_size
        num_new = computed_after - num_hit_tokens
        if self.kv.allocate_slots(request, num_new, hits, cache_blocks=False) is None:
            return None
        self.waiting.popleft()
        if request.num_preemptions == 0:
            self.kv.record_prefix_lookup(request.num_tokens, num_hit_tokens)
        request.num_computed_tokens = num_hit_tokens
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        local_ids = self.kv.get_block_ids(request.request_id)[first_block:]
        self.waiting_for_kv[request.request_id] = _PendingPull(
            request, num_hit_tokens, computed_after
        )
        onboard = KVOnboard(
            request_id=request.request_id,
            block_hashes=lookup.onboard_hashes(),
            tiers=lookup.run_tiers[:num_blocks],
            local_block_ids=tuple(local_ids[:num_blocks]),
            first_token=first_block * block_size,
            num_tokens=num_new,
        )
        self.tiers.commit(lookup, onboard)
        return onboard

    def _lease(self, request: Request) -> dict:
        """Keep a finished prefill request's blocks for a decode worker; its response params.

        A second prefill under the same request id (a client reusing ``x-request-id``)
        replaces the first lease, whose blocks are released rather than leaked.
        """
        self.release_lease(request.request_id)
        blocks = self.kv.detach(request)
        lease = KVLease(
            request_id=request.request_id,
            block_ids=[b.block_id for b in blocks],
            num_tokens=request.num_prompt_tokens,
            expires_at_s=self.clock() + self.config.kv_lease_s,
        )
        self.leases[request.request_id] = _HeldBlocks(lease, blocks)
        self._free_request(request)
        return lease_params(lease, self.config.kv_lease_s)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.appendleft(request)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        if not params.ignore_eos and token_id == request.eos_token_id:
            request.status = RequestStatus.FINISHED_STOPPED
        elif token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
        elif (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.config.max_model_len
        ):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED

    def _free_request(self, request: Request) -> None:
        self.kv.free(request)
        del self.requests[request.request_id]
        self.times.pop(request.request_id, None)
        self._finished_req_ids.add(request.request_id)
