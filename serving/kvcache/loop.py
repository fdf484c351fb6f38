"""The engine thread's side of the KV tiers: hand jobs to the manager, apply what it reports.

Called only from the worker's engine thread (``serving/worker/engine_loop.py``), which owns the
engine core and therefore the tier stack; the manager's threads only ever ``post`` messages.
"""

from __future__ import annotations

from typing import Any

from serving.engine.core import EngineCore
from serving.engine.outputs import EngineStepResult
from serving.kvcache.manager import KVTierManager, Listed, OnboardDone, OnboardLanded, StoreDone
from serving.kvcache.metrics import TierMetrics
from serving.kvcache.stack import TierStack

TIER_MESSAGES = (StoreDone, OnboardDone, OnboardLanded, Listed)


class TierLoop:
    """Owns nothing but the wiring between core, manager and metrics."""

    def __init__(self, core: EngineCore, manager: KVTierManager, metrics: TierMetrics) -> None:
        self.core = core
        self.stack: TierStack = core.tiers
        self.manager = manager
        self.metrics = metrics

    def on_message(self, message: Any) -> None:
        if isinstance(message, StoreDone):
            self.core.finish_tier_job(message.job_id, succeeded=message.succeeded)
            if message.succeeded:
                self.metrics.record_transfer(
                    message.tier, "offload", message.num_bytes, message.duration_s
                )
        elif isinstance(message, OnboardDone):
            self.core.finish_kv_onboard(message.onboard, message.result, message.in_flight)
        elif isinstance(message, OnboardLanded):
            by_tier = dict(message.num_bytes_by_tier)
            self.metrics.record_onboard(by_tier, message.duration_s)
            if len(by_tier) == 1:  # one tier's bytes in one duration: a bandwidth sample
                ((tier, num_bytes),) = by_tier.items()
                self.stack.cost.observe_transfer(tier, num_bytes, message.duration_s)
        elif isinstance(message, Listed):
            self.stack.apply_listing(message.tier, message.block_hashes)
            self.metrics.record_listing(message.tier)

    def after_step(
        self, result: EngineStepResult, wall_s: float, observe_prefill: bool = True
    ) -> None:
        """Hand the step's onboards and copies to the manager; its prefill time feeds the cost
        check unless ``observe_prefill`` is off (a warm-up step's compilation)."""
        for onboard in result.kv_onboards:
            self.manager.submit_onboard(onboard)
        if result.tier_jobs:
            self.manager.submit(result.tier_jobs)
        num_prompt_tokens = result.stats.num_prompt_tokens
        if num_prompt_tokens and observe_prefill:
            self.stack.cost.observe_prefill(num_prompt_tokens, result.step_duration_s or wall_s)

    def pump(self) -> None:
        """Submit jobs planned outside a step; refresh the metrics."""
        jobs = self.core.take_tier_jobs()
        if jobs:
            self.manager.submit(jobs)
        self.metrics.record_stats(self.stack.take_stats())
        pool = self.core.kv_cache_manager.block_pool
        self.metrics.set_occupancy("G1", pool.num_cached_blocks, pool.num_blocks)
        for index in self.stack.tiers:
            self.metrics.set_occupancy(index.name, len(index.entries), index.capacity_blocks)
