"""Runs an ``EngineCore`` in its own thread and serves it to asyncio code.

The engine thread owns the core, the output processor and the KV-event publisher: nothing else
touches them. asyncio handlers talk to it through a thread-safe inbox (add/abort) and get their
outputs back through one ``loop.call_soon_threadsafe`` per step. The mock engine's modelled step
time is slept here, so a mock worker behaves in real time like a GPU worker would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.engine.core import EngineCore
from serving.engine.kv_transfer import KVLease, KVPull
from serving.engine.output_processor import OutputProcessor, RequestOutput
from serving.engine.request import Request, RequestStatus
from serving.kvcache.loop import TIER_MESSAGES, TierLoop
from serving.worker.kv_connector import KVConnector, PullResult
from serving.worker.kv_events import NullEventPublisher, ZmqEventPublisher
from serving.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

# The engine thread wakes at least this often when idle, to notice shutdown.
_IDLE_WAIT_S = 0.5
# ... and this often while it holds prefill leases, to see release notifications.
_LEASE_POLL_S = 0.02
# Concurrent KV pulls (each is one transfer; more only queue on the same link).
_MAX_PULLS_IN_FLIGHT = 4


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: deltas joined, the rest from ``then``."""
    return dataclasses.replace(
        then,
        text=first.text + then.text,
        token_ids=first.token_ids + then.token_ids,
        logprobs=first.logprobs + then.logprobs,
    )


class EngineDeadError(RuntimeError):
    """The engine thread failed; the worker can no longer serve."""


@dataclass(slots=True)
class _Add:
    request: Request
    include_stop_str_in_output: bool


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _LeaseOp:
    """Renew (``lease_s`` > 0) or release a prefill lease, answered through ``future``."""

    request_id: str
    lease_s: float | None
    release: bool
    future: concurrent.futures.Future[KVLease | bool | None]


_Message = _Add | _Abort | PullResult | _LeaseOp


class AsyncEngine:
    """``generate()`` streams ``RequestOutput`` deltas; leaving the iterator early aborts."""

    def __init__(
        self,
        core: EngineCore,
        output_processor: OutputProcessor,
        metrics: WorkerMetrics,
        publisher: ZmqEventPublisher | NullEventPublisher | None = None,
        connector: KVConnector | None = None,
        tiers: TierLoop | None = None,
    ) -> None:
        self.core = core
        # KV tiers below the device: their threads report through the inbox.
        self.tiers = tiers
        if tiers is not None:
            tiers.manager.post = self._post
        self.output_processor = output_processor
        self.metrics = metrics
        self.publisher = publisher or NullEventPublisher()
        self.connector = connector
        self._pull_pool = concurrent.futures.ThreadPoolExecutor(
            _MAX_PULLS_IN_FLIGHT, thread_name_prefix="kv-pull"
        )
        # The engine thread's view of its leases, for /v1/kv/leases (read-only elsewhere).
        self.leases_snapshot: list[KVLease] = []
        self._inbox: deque[_Message] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_token_s: dict[str, float | None] = {}
        self.dead_error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.tiers is not None:
            self.tiers.manager.start()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._pull_pool.shutdown(wait=False, cancel_futures=True)
        if self.tiers is not None:
            self.tiers.manager.close()
        self.publisher.close()
        if self.connector is not None:
            self.connector.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_active_requests(self) -> int:
        return len(self._queues)

    # -- asyncio side --------------------------------------------------------------------------

    async def generate(
        self, request: Request, *, include_stop_str_in_output: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Add ``request`` and yield its outputs until it finishes.

        ``ValueError`` from the engine (a prompt that can never fit) is raised from the first
        iteration. Closing the iterator before the end (client disconnect) aborts the request.
        """
        if self.dead_error is not None:
            raise EngineDeadError(f"engine failed: {self.dead_error}")
        if request.request_id in self._queues:
            raise ValueError(f"request id {request.request_id!r} is already running")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._post(_Add(request, include_stop_str_in_output))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                # Steps that came while the client was being served go out as one output.
                error = None
                while not item.finished and not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        error = more
                        break
                    item = merge_outputs(item, more)
                finished = item.finished
                yield item
                if error is not None:
                    finished = True
                    raise error
                if finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self._post(_Abort(request.request_id))

    async def lease_op(
        self, request_id: str, *, release: bool = False, lease_s: float | None = None
    ) -> KVLease | bool | None:
        """Renew a lease (-> the lease, or None if unknown) or release it (-> found)."""
        future: concurrent.futures.Future[KVLease | bool | None] = concurrent.futures.Future()
        self._post(_LeaseOp(request_id, lease_s, release, future))
        return await asyncio.wrap_future(future)

    def _post(self, message: _Message) -> None:
        self._inbox.append(message)
        self._wake.set()

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(item)

    # -- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                errors = self._drain_inbox()
                if errors:
                    self._send(errors)
                self._maintain_leases()
                if self.tiers is not None:
                    self._pump_tiers()
                if not self.core.has_unfinished_requests():
                    self.metrics.record_step(self.core.scheduler.make_stats())
                    self._wake.wait(_LEASE_POLL_S if self.leases_snapshot else _IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                if not self._step():
                    # Every request waits on KV from elsewhere: sleep until a message comes
                    # (pull and tier results post one) instead of spinning on empty steps,
                    # which starves the copying threads of the GIL.
                    self._wake.wait(_LEASE_POLL_S)
                    self._wake.clear()
        except BaseException as exc:
            logger.exception("engine thread failed")
            self.dead_error = exc
            dead = EngineDeadError(f"engine failed: {exc}")
            self._send([(req_id, dead) for req_id in list(self._queues)])

    def _drain_inbox(self) -> list[tuple[str, RequestOutput | BaseException]]:
        errors: list[tuple[str, RequestOutput | BaseException]] = []
        aborts: list[str] = []
        while self._inbox:
            message = self._inbox.popleft()
            if isinstance(message, _Abort):
                aborts.append(message.request_id)
                continue
            if isinstance(message, PullResult):
                self.metrics.record_kv_pull(message)
                self.core.finish_kv_pull(message.request_id, succeeded=message.succeeded)
                continue
            if isinstance(message, _LeaseOp):
                self._lease_op(message)
                continue
            if isinstance(message, TIER_MESSAGES):
                assert self.tiers is not None
                self.tiers.on_message(message)
                continue
            request = message.request
            try:
                self.core.add_request(request)
            except ValueError as exc:
                errors.append((request.request_id, exc))
                continue
            self.output_processor.add_request(
                request.request_id,
                request.prompt_token_ids,
                skip_special_tokens=request.sampling_params.skip_special_tokens,
                stop=request.sampling_params.stop,
                include_stop_str_in_output=message.include_stop_str_in_output,
            )
            self._last_token_s[request.request_id] = None
        if aborts:
            for _ in self.core.abort_requests(aborts):
                self.metrics.record_aborted()
            for request_id in aborts:
                self.output_processor.remove_request(request_id)
                self._last_token_s.pop(request_id, None)
        return errors

    def _lease_op(self, op: _LeaseOp) -> None:
        if op.release:
            found = self.core.release_lease(op.request_id)
            if found:
                self.metrics.record_lease_released("released")
            op.future.set_result(found)
        else:
            op.future.set_result(self.core.renew_lease(op.request_id, op.lease_s))

    def _maintain_leases(self) -> None:
        """Free leases whose blocks were pulled (notifications) or whose time ran out.

        Runs every loop iteration, so it does nothing without leases (a decode worker's case):
        a release notification only matters while its lease exists.
        """
        if not self.core.scheduler.leases:
            if self.leases_snapshot:
                self.leases_snapshot = []
                self.metrics.kv_leases.set(0)
            return
        if self.connector is not None:
            for request_id in self.connector.poll_released():
                if self.core.release_lease(request_id):
                    self.metrics.record_lease_released("pulled")
        for _ in self.core.expire_leases():
            self.metrics.record_lease_released("expired")
        self.leases_snapshot = self.core.leases
        self.metrics.kv_leases.set(len(self.leases_snapshot))

    def _pump_tiers(self) -> None:
        """Copies planned between steps go out; tier events made there are published."""
        assert self.tiers is not None
        self.tiers.pump()
        if not self.core.has_unfinished_requests():
            events = self.core.take_kv_events()
            if events:
                self.publisher.publish(events)

    def _start_pulls(self, pulls: list[KVPull]) -> None:
        for pull in pulls:
            if self.connector is None:
                logger.warning(
                    "request %s carries remote prefill KV but this worker has no KV transport "
                    "(start it with --role decode or --kv-transport): prefilling locally",
                    pull.request_id,
                )
                self._post(PullResult(pull.request_id, False, 0, 0.0, error="no KV transport"))
                continue
            future = self._pull_pool.submit(self.connector.run_pull, pull)
            future.add_done_callback(functools.partial(self._pull_done, pull.request_id))

    def _pull_done(self, request_id: str, future: concurrent.futures.Future[PullResult]) -> None:
        if future.cancelled():
            return
        try:
            result = future.result()
        except Exception as exc:  # run_pull reports failures; this is a bug, not a lost request
            logger.exception("KV pull for %s raised", request_id)
            result = PullResult(request_id, False, 0, 0.0, error=repr(exc))
        self._post(result)

    def _step(self) -> bool:
        """One engine step and its outputs; False when the step was idle (``EngineStepResult``)."""
        started_s = time.monotonic()
        result = self.core.step()
        if result.kv_pulls:
            self._start_pulls(result.kv_pulls)
        if self.tiers is not None:
            self.tiers.after_step(result, time.monotonic() - started_s)
        outputs, stopped = self.output_processor.process(result.outputs)
        if stopped:
            self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        events = self.core.take_kv_events()
        if events:  # as vLLM: a batch only when something changed
            self.publisher.publish(events)
        if result.step_duration_s:
            remaining_s = result.step_duration_s - (time.monotonic() - started_s)
            if remaining_s > 0:
                self._stop.wait(remaining_s)
        self.metrics.record_step(result.stats)
        now_s = time.monotonic()
        for out in outputs:
            prev_s = self._last_token_s.get(out.request_id)
            if out.times is not None:
                # The modelled time is the truth for the mock engine: stamp after the sleep.
                out.times.last_token_s = now_s
                if prev_s is None and out.num_output_tokens <= len(out.token_ids):
                    out.times.first_token_s = now_s
            self.metrics.record_token(out, prev_s)
            self._last_token_s[out.request_id] = now_s
            if out.finished:
                self.metrics.record_finished(out, now_s)
                self._last_token_s.pop(out.request_id, None)
        self._send([(out.request_id, out) for out in outputs])
        return not result.idle

    def _send(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)
