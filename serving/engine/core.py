"""The engine loop body: schedule -> execute -> update, one step at a time. No threads, no I/O.

``EngineCore`` glues the scheduler (pure Python) to an executor: the real ``ModelRunner``
(torch) or the mock engine's ``MockModelRunner`` (a timing model). Both see the same
``SchedulerOutput`` and return the same ``ModelRunnerOutput``, so the mock engine schedules,
caches prefixes, preempts and emits KV events exactly like the real one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.kv_offload import KVOnboard
from serving.engine.kv_transfer import DEFAULT_LEASE_S, KVLease, RemotePrefill
from serving.engine.outputs import EngineCoreOutput, EngineStepResult, SchedulerStats
from serving.engine.request import Request, RequestStatus
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.scheduler_output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from serving.protocol.kv_events import KVCacheEvent

logger = logging.getLogger(__name__)


class ModelExecutor(Protocol):
    """What the engine needs from a model runner (real or mock)."""

    block_size: int
    num_blocks: int
    kv_bytes_per_token: int

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Limits derived from the model and the KV pool, computed once at start."""

    max_model_len: int
    num_blocks: int
    block_size: int


class EngineCore:
    """One engine: a scheduler, a KV cache manager and an executor, stepped by its owner."""

    def __init__(
        self,
        executor: ModelExecutor,
        scheduler_config: SchedulerConfig,
        *,
        enable_prefix_caching: bool = True,
        kv_lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor
        # A request must fit the pool on its own, or it could never finish.
        pool_tokens = executor.num_blocks * executor.block_size
        max_model_len = min(scheduler_config.max_model_len, pool_tokens)
        if max_model_len < scheduler_config.max_model_len:
            logger.warning(
                "max_model_len lowered from %d to %d tokens: the KV cache holds %d blocks of %d",
                scheduler_config.max_model_len,
                max_model_len,
                executor.num_blocks,
                executor.block_size,
            )
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=scheduler_config.max_num_seqs,
            max_num_batched_tokens=scheduler_config.max_num_batched_tokens,
            max_model_len=max_model_len,
            kv_lease_s=kv_lease_s,
        )
        self.limits = EngineLimits(max_model_len, executor.num_blocks, executor.block_size)
        self.kv_cache_manager = KVCacheManager(
            executor.num_blocks, executor.block_size, enable_caching=enable_prefix_caching
        )
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache_manager, clock=clock)
        self.clock = clock
        # KV tiers below the device (serving.kvcache.stack.TierStack), if any.
        self.tiers: Any = None

    def attach_tiers(self, stack: Any) -> None:
        """Put lower KV tiers behind the block pool: prefix lookups continue in them, new
        blocks are copied down, and their events join the pool's KV events in order."""
        pool = self.kv_cache_manager.block_pool
        pool.track_new_blocks()
        stack.emit = pool.record_event
        self.tiers = stack
        self.scheduler.tiers = stack

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ``ValueError`` if it can never fit (caller maps to 400).

        ``kv_transfer_params`` with ``do_remote_prefill`` make it a disaggregated decode
        request: ``step`` then reports a ``KVPull`` for it instead of computing its prompt.
        """
        request.remote_prefill = RemotePrefill.from_params(request.kv_transfer_params)
        limit = self.limits.max_model_len
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if request.num_prompt_tokens >= limit:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens, but this model's "
                f"context length is {limit} tokens (prompt plus at least one output token)"
            )
        self.scheduler.add_request(request)

    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> list[str]:
        """Finish live requests now (client gone, stop string matched); frees their blocks."""
        return self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> EngineStepResult:
        """Run one step: returns new tokens per request, stats and the modelled step time."""
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs: list[EngineCoreOutput] = self.scheduler.update_from_output(
            scheduler_output, runner_output
        )
        stats: SchedulerStats = self.scheduler.make_stats()
        stats.num_prompt_tokens = sum(
            seq.num_tokens for seq in scheduler_output.seqs if not _is_decode(seq)
        )
        stats.num_generation_tokens = len(outputs)
        return EngineStepResult(
            outputs=outputs,
            stats=stats,
            step_duration_s=runner_output.step_duration_s,
            kv_pulls=scheduler_output.kv_pulls,
            kv_onboards=scheduler_output.kv_onboards,
            tier_jobs=self._offload_new_blocks(),
        )

    # -- KV tiers --------------------------------------------------------------------------------

    def _offload_new_blocks(self) -> list[Any]:
        """After a step: plan copies of the blocks it filled; hold them until copied."""
        if self.tiers is None:
            return []
        pool = self.kv_cache_manager.block_pool
        held = self.tiers.on_blocks_computed(pool.take_new_blocks())
        pool.touch(pool.blocks[block_id] for block_id in held)
        return self.tiers.take_jobs()

    def finish_kv_onboard(self, onboard: KVOnboard, result: Any, in_flight: Any = None) -> bool:
        """An onboard from ``step().kv_onboards`` ended (``serving.kvcache.stack.OnboardResult``):
        its loaded blocks count as computed, failed ones are dropped from their tier.

        ``in_flight`` (``serving.kvcache.manager.CopiesInFlight``): the bytes are checked but
        the copies into the GPU pool may still run; every later step on this thread's stream
        is ordered after them, so the next step can be launched at once."""
        if in_flight is not None:
            in_flight.order_before_compute()
        self.tiers.finish_onboard(onboard, result)
        num_loaded = min(result.num_loaded_blocks * self.limits.block_size, onboard.num_tokens)
        return self.scheduler.finish_kv_onboard(onboard.request_id, num_loaded)

    def finish_tier_job(self, job_id: int, *, succeeded: bool) -> None:
        """A store job from ``tier_jobs`` ended: the block it copied from may be reused now."""
        block_id = self.tiers.finish_store(job_id, succeeded)
        if block_id is not None:
            pool = self.kv_cache_manager.block_pool
            pool.free_blocks([pool.blocks[block_id]])

    def take_tier_jobs(self) -> list[Any]:
        """Jobs planned outside a step (copies down after a store, drops after an onboard)."""
        return self.tiers.take_jobs() if self.tiers is not None else []

    # -- disaggregation ------------------------------------------------------------------------

    def finish_kv_pull(self, request_id: str, *, succeeded: bool) -> bool:
        """A pull from ``step().kv_pulls`` ended (see ``Scheduler.finish_kv_pull``)."""
        return self.scheduler.finish_kv_pull(request_id, succeeded=succeeded)

    def release_lease(self, request_id: str) -> bool:
        """Free a prefill lease's blocks (the decode worker confirmed its pull)."""
        return self.scheduler.release_lease(request_id)

    def renew_lease(self, request_id: str, lease_s: float | None = None) -> KVLease | None:
        return self.scheduler.renew_lease(request_id, lease_s)

    def expire_leases(self) -> list[str]:
        """Free the leases whose time ran out; returns their request ids."""
        return self.scheduler.expire_leases()

    @property
    def leases(self) -> list[KVLease]:
        return [held.lease for held in self.scheduler.leases.values()]

    def take_kv_events(self) -> list[KVCacheEvent]:
        """KV cache events since the last call, in order (BlockStored/BlockRemoved/...)."""
        return self.kv_cache_manager.take_events()

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()


def _is_decode(seq: ScheduledSeq) -> bool:
    """One new token after at least one output: a decode (anything else computes prompt KV)."""
    return seq.num_tokens == 1 and seq.num_output_tokens > 0
