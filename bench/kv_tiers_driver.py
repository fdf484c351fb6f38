"""The engine ``bench/kv_tiers.py`` steps: one engine core with one tier behind it, driven
synchronously from this thread through the worker's own ``TierLoop`` (the manager's threads copy),
and the onboard's phases recorded as the reports arrive."""

from __future__ import annotations

import queue
import time
from typing import Any

from prometheus_client import CollectorRegistry

from serving.engine.core import EngineCore
from serving.engine.request import Request, SamplingParams
from serving.kvcache.build import model_identity
from serving.kvcache.copy_run import DEFAULT_MAX_RUN_BYTES
from serving.kvcache.loop import TierLoop
from serving.kvcache.manager import KVTierManager, OnboardDone, OnboardLanded
from serving.kvcache.metrics import TierMetrics
from serving.kvcache.policy import (
    CUDA_HOST_BANDWIDTH_BYTES_PER_S,
    CUDA_PREFILL_TOKENS_PER_S,
    DEFAULT_PREFILL_TOKENS_PER_S,
    CostModel,
)
from serving.kvcache.stack import TierIndex, TierStack
from serving.kvcache.tier import KVTier


class Driver:
    """Steps one engine synchronously with one tier behind it; the manager's threads copy."""

    def __init__(
        self,
        core: EngineCore,
        store: KVTier,
        *,
        on_cuda: bool,
        verify: bool,
        max_copy_run_bytes: int = DEFAULT_MAX_RUN_BYTES,
        num_read_threads: int = 8,
    ) -> None:
        self.core = core
        for block_hash in list(store.list_hashes()):  # a new stack starts from an empty tier
            store.delete(block_hash)
        runner: Any = core.executor
        block_size = core.limits.block_size
        cost = CostModel.make(
            block_size,
            runner.kv_bytes_per_token * block_size,
            bandwidths={"G2": CUDA_HOST_BANDWIDTH_BYTES_PER_S} if on_cuda else None,
            prefill_tokens_per_s=CUDA_PREFILL_TOKENS_PER_S
            if on_cuda
            else DEFAULT_PREFILL_TOKENS_PER_S,
        )
        cost.check = False  # turn 2 always onboards; the check's choice is asked separately
        self.stack = TierStack(
            [TierIndex(store.name, store.capacity_blocks, store.shared)], cost, min_uses=1
        )
        core.attach_tiers(self.stack)
        self.inbox: queue.Queue[Any] = queue.Queue()
        manager = KVTierManager(
            [store],
            block_view=runner.kv_pool.block_bytes_view,
            identity=model_identity(core, None),
            post=self.inbox.put,
            list_interval_s=3600,
            max_copy_run_bytes=max_copy_run_bytes,
            num_read_threads=num_read_threads,
        )
        if not verify:
            manager.verify_checksums = False
        metrics = TierMetrics(CollectorRegistry(), {"model_name": "bench", "engine": "builtin"},
                              [store.name])  # fmt: skip
        self.loop = TierLoop(core, manager, metrics)
        self.manager = manager
        self.onboard_s: list[float] = []  # start -> every byte in device memory
        self.checked_s: list[float] = []  # start -> every checksum known (the engine goes on)
        self.admitted_s: list[float] = []  # start -> every header checked and copy queued
        self.onboard_done_at_s: float | None = None
        self.after_onboard_s = 0.0

    def _apply(self, message: Any) -> None:
        """The worker's handling (``TierLoop``), plus the onboard's phases for the table."""
        self.loop.on_message(message)
        if isinstance(message, OnboardDone):
            self.checked_s.append(message.result.duration_s)
            self.admitted_s.append(message.admitted_s)
            self.onboard_done_at_s = time.perf_counter()
        elif isinstance(message, OnboardLanded):
            self.onboard_s.append(message.duration_s)
        self.loop.pump()

    def _drain(self, block: bool) -> None:
        """Apply what the manager reported; with ``block``, wait for at least one report."""
        if block:
            try:
                self._apply(self.inbox.get(timeout=120))
            except queue.Empty:
                raise TimeoutError("no tier copy reported within 120 s") from None
        while True:
            try:
                self._apply(self.inbox.get_nowait())
            except queue.Empty:
                return

    def ttft(self, request_id: str, prompt: list[int], observe: bool = True) -> tuple[float, int]:
        """Seconds from arrival to the first token, and the prompt tokens found cached;
        ``observe``: the steps' times feed the cost check's prefill speed (not while warming
        up: a first step's compilation is not the machine's speed)."""
        started_s = time.perf_counter()
        self.onboard_done_at_s = None
        self.core.add_request(Request(request_id, prompt, SamplingParams(max_tokens=1)))
        while True:
            self._drain(block=False)
            if not self.core.has_unfinished_requests():
                self._drain(block=True)  # waiting for an onboard
                continue
            step_started_s = time.perf_counter()
            result = self.core.step()
            wall_s = time.perf_counter() - step_started_s
            self.loop.after_step(result, wall_s, observe_prefill=observe)
            if result.idle:
                self._drain(block=True)  # waiting for an onboard: sleep, as the worker does
                continue
            for out in result.outputs:
                if out.request_id == request_id:
                    ended_s = time.perf_counter()
                    ttft_s = ended_s - started_s
                    if self.onboard_done_at_s is not None:
                        self.after_onboard_s = ended_s - self.onboard_done_at_s
                    self.core.take_kv_events()
                    return ttft_s, out.num_cached_tokens

    def wait_stored(self) -> None:
        """Until every copy down is done (the prefix is all in the tier) and every onboard's
        bytes have landed."""
        while self.stack.num_jobs_in_flight or len(self.onboard_s) < len(self.checked_s):
            self._drain(block=True)

    def close(self) -> None:
        self.manager.close()
