"""The router as the frontend uses it: KV index + load tracking + a policy, behind four calls.

``route`` picks a worker and counts the request against it; ``first_token``, ``tokens`` and
``finish`` keep the load current. KV events arrive through ``apply_events``. Everything runs on
the frontend's event loop (the index is not thread-safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from serving.frontend.metrics import FrontendMetrics
from serving.protocol.kv_events import KVEventBatch
from serving.router.indexer import KVIndexer
from serving.router.policies import (
    KVCostConfig,
    PolicyName,
    RequestView,
    RoutingDecision,
    RoutingPolicy,
    WorkerLoad,
    make_policy,
    route_request,
)

logger = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        policy: PolicyName,
        block_size: int,
        metrics: FrontendMetrics,
        *,
        cost: KVCostConfig | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        model: str | None = None,
    ) -> None:
        """``model``: the served model name on this router's series (default: the metrics')."""
        self.policy_name = policy
        self.model = model or metrics.model or ""
        self.block_size = block_size
        self.metrics = metrics
        self.indexer = KVIndexer(block_size)
        self.load = WorkerLoad(block_size)

        def build() -> RoutingPolicy:
            return make_policy(
                policy,
                self.load,
                cost or KVCostConfig(block_size=block_size),
                indexer=self.indexer,
                clock=clock,
                seed=seed,
            )

        self.policy = build()
        # Prefill workers are chosen by a policy instance of their own: stateful policies
        # (round-robin's cursor, session stickiness, approx's prefix memory) must not mix
        # decisions about the two pools (one cursor for both sent every stream to one worker).
        self.prefill_policy = build()
        self._worker_of: dict[str, str] = {}

    # -- workers -------------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        self.indexer.add_worker(worker_id)
        # Every per-worker series exists from the start (at 0), so dashboards see idle workers.
        self.metrics.kv_event_gaps.labels(model=self.model, worker=worker_id).inc(0)
        self.metrics.kv_event_batches.labels(model=self.model, worker=worker_id).inc(0)
        self._publish_load(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        """Drop the worker's blocks and load; its requests are being migrated or failed."""
        self.indexer.remove_worker(worker_id)
        self.load.remove_worker(worker_id)
        for policy in (self.policy, self.prefill_policy):
            remover = getattr(policy, "remove_worker", None)
            if remover is not None:
                remover(worker_id)
        self.metrics.forget_worker(self.model, worker_id)

    def apply_events(self, worker_id: str, batch: KVEventBatch) -> None:
        self.indexer.apply_events(worker_id, batch.events)
        self.metrics.kv_event_batches.labels(model=self.model, worker=worker_id).inc()
        for event in batch.events:
            self.metrics.kv_events.labels(model=self.model, type=type(event).__name__).inc()

    # -- requests ------------------------------------------------------------------------------

    def route(
        self,
        request_id: str,
        token_ids: Sequence[int],
        worker_ids: Sequence[str],
        session_id: str | None = None,
        *,
        prefill: bool = False,
    ) -> RoutingDecision:
        """Choose among ``worker_ids`` (raises ``NoWorkersError`` when empty); ``prefill``:
        a prefill worker for a disaggregated request (its own policy instance)."""
        hashes = (
            self.indexer.hash_request(token_ids) if self.policy_name in ("kv", "approx") else []
        )
        view = RequestView(request_id, len(token_ids), hashes, session_id)
        policy = self.prefill_policy if prefill else self.policy
        decision = route_request(policy, self.load, view, list(worker_ids))
        self._worker_of[request_id] = decision.worker_id
        self.metrics.decisions.labels(
            model=self.model,
            policy=decision.policy,
            reason=decision.reason,
            worker=decision.worker_id,
        ).inc()
        self.metrics.predicted_cached_tokens.labels(model=self.model, policy=decision.policy).inc(
            min(decision.num_cached_blocks * self.block_size, len(token_ids))
        )
        self._publish_load(decision.worker_id)
        return decision

    def first_token(self, request_id: str) -> None:
        self.load.mark_prefill_done(request_id)
        self._publish_load(self._worker_of.get(request_id))

    def tokens(self, request_id: str, num_tokens: int) -> None:
        self.load.add_output_tokens(request_id, num_tokens)

    def finish(self, request_id: str) -> None:
        self.load.finish_request(request_id)
        self._publish_load(self._worker_of.pop(request_id, None))

    def _publish_load(self, worker_id: str | None) -> None:
        if worker_id is None:
            return
        m, model = self.metrics, self.model
        m.worker_active_requests.labels(model=model, worker=worker_id).set(
            self.load.num_active_requests(worker_id)
        )
        m.worker_decode_blocks.labels(model=model, worker=worker_id).set(
            self.load.active_decode_blocks(worker_id)
        )
        m.worker_prefill_tokens.labels(model=model, worker=worker_id).set(
            self.load.active_prefill_tokens(worker_id)
        )
