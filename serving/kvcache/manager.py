"""Moves KV block bytes between the engine's pool and the tier stores, off the engine thread.

The engine thread plans (``TierStack``); this shell executes and reports back through ``post``
(the worker's engine inbox), never touching the stack itself:

* ``StoreJob`` -> one writer thread per tier, in order (deletions of evicted blocks, then the
  write), -> ``StoreDone``. A block leaving the device is hashed once (``header.make_header``)
  and its header travels with it down the tiers.
* ``KVOnboard`` -> the blocks are read in parallel, their headers and checksums checked, and
  the good ones copied into their device blocks (on a side CUDA stream on a GPU) ->
  ``OnboardDone`` with the leading run that landed and every block that failed.
* ``DropJob`` -> the tier's writer thread deletes the bad blocks.
* shared stores (G4) are listed every ``list_interval_s`` -> ``Listed``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from serving.engine.kv_offload import KVOnboard
from serving.kvcache.copy_run import DEFAULT_MAX_RUN_BYTES, CopyRun
from serving.kvcache.header import (
    BlockHeader,
    BlockRejected,
    ChecksumMismatch,
    ModelIdentity,
    check_header,
    make_header,
    verify_payload,
)
from serving.kvcache.slot_hasher import DigestsInFlight
from serving.kvcache.stack import DropJob, OnboardResult, StoreJob, TierJob
from serving.kvcache.tier import KVTier, TierIOError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreDone:
    job_id: int
    tier: str
    succeeded: bool
    num_bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class CopiesInFlight:
    """An onboard's host -> device copies, queued on the manager's side stream and maybe still
    running: the engine's own stream waits for them before it computes with those blocks."""

    event: torch.cuda.Event
    device: torch.device

    @classmethod
    def record(cls, stream: torch.cuda.Stream) -> CopiesInFlight:
        event = torch.cuda.Event()
        event.record(stream)
        return cls(event, stream.device)

    def order_before_compute(self) -> None:
        """Work queued after this call on the device's current stream starts after the copies
        (the GPU waits; the calling thread does not)."""
        torch.cuda.current_stream(self.device).wait_event(self.event)


@dataclass(frozen=True, slots=True)
class OnboardDone:
    """Every block's checks are done: ``result`` says which loaded. ``in_flight``: the copies
    may still be running (GPU); None when they have ended."""

    onboard: KVOnboard
    result: OnboardResult
    in_flight: CopiesInFlight | None = None
    admitted_s: float = 0.0  # start -> every block read, its header checked and copy queued


@dataclass(frozen=True, slots=True)
class OnboardLanded:
    """The onboard's bytes are all in device memory (after its ``OnboardDone``): what moved and
    how long from its start, for the transfer metrics and the cost check's bandwidth."""

    request_id: str
    num_bytes_by_tier: tuple[tuple[str, int], ...]
    duration_s: float


@dataclass(frozen=True, slots=True)
class Listed:
    tier: str
    block_hashes: tuple[int, ...]


TierMessage = StoreDone | OnboardDone | OnboardLanded | Listed


class KVTierManager:
    """Owns the stores, their threads and the listing thread; reports through ``post``.

    ``block_view(block_id)`` returns a device block's bytes in place (``KVPool.block_bytes_view``).
    """

    def __init__(
        self,
        stores: Sequence[KVTier],
        *,
        block_view: Callable[[int], torch.Tensor],
        identity: ModelIdentity,
        post: Callable[[TierMessage], None] | None = None,
        list_interval_s: float = 5.0,
        # On the GPU hosts 16 threads checked a 2 GiB onboard no sooner than 8 (the hashing
        # shares host memory bandwidth with the copies) and made the next steps noisier.
        num_read_threads: int = 8,
        max_copy_run_bytes: int = DEFAULT_MAX_RUN_BYTES,
    ) -> None:
        self.stores = {store.name: store for store in stores}
        self.block_view = block_view
        self.identity = identity
        self.post: Callable[[TierMessage], None] = post or (lambda message: None)
        self._writers = {
            name: ThreadPoolExecutor(1, thread_name_prefix=f"kv-{name}-write")
            for name in self.stores
        }
        self._onboards = ThreadPoolExecutor(2, thread_name_prefix="kv-onboard")
        self._reads = ThreadPoolExecutor(num_read_threads, thread_name_prefix="kv-read")
        self._num_read_threads = num_read_threads
        self._cuda_stream = None
        self._stream_lock = threading.Lock()  # read threads ask for the stream at once
        # False only to measure what checking costs (bench/kv_tiers.py --no-verify).
        self.verify_checksums = True
        self._closed = threading.Event()
        self._list_interval_s = list_interval_s
        self._lister: threading.Thread | None = None
        self.num_onboard_copies = 0  # copies launched by onboards (runs of blocks coalesce)
        # The largest run of consecutive blocks copied as one (0: a copy per block).
        self.max_copy_run_bytes = max_copy_run_bytes
        self._count_lock = threading.Lock()  # two onboard threads add to it
        self._in_flight: list[CopiesInFlight] = []  # onboards whose copies may still run

    def start(self) -> None:
        """Start listing shared stores (the first listing is posted right away)."""
        shared = [s for s in self.stores.values() if s.shared]
        if shared and self._lister is None:
            self._lister = threading.Thread(
                target=self._list_loop, args=(shared,), name="kv-list", daemon=True
            )
            self._lister.start()

    def close(self) -> None:
        self._closed.set()
        for pool in (*self._writers.values(), self._onboards, self._reads):
            pool.shutdown(wait=False, cancel_futures=True)
        for store in self.stores.values():
            store.close()

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[TierJob]) -> None:
        for job in jobs:
            writer = self._writers[job.tier]
            if isinstance(job, StoreJob):
                writer.submit(self._guard, self._run_store, job)
            else:
                writer.submit(self._guard, self._run_drop, job)

    def submit_onboard(self, onboard: KVOnboard) -> None:
        self._onboards.submit(self._guard, self._run_onboard, onboard)

    def _guard(self, fn: Callable[..., None], job: object) -> None:
        try:
            fn(job)
        except Exception:  # a bug: say so loudly, the engine keeps going
            logger.exception("KV tier job %r failed", job)

    # -- stores ----------------------------------------------------------------------------------

    def _run_store(self, job: StoreJob) -> None:
        started_s = time.perf_counter()
        store = self.stores[job.tier]
        num_bytes = 0
        succeeded = False
        try:
            if store.in_memory and job.evict_hashes:
                self._wait_for_onboard_copies()  # an evicted slot may be a copy's source
            for block_hash in job.evict_hashes:
                store.delete(block_hash)
            if job.source_tier == "G1":
                assert job.source_block_id is not None
                payload = self._device_to_host(job.source_block_id)
                info = job.info
                header = make_header(
                    job.block_hash, info.parent_hash, info.token_ids, _bytes(payload), self.identity
                ).encode()
            else:
                found = self.stores[job.source_tier].read(job.block_hash)
                if found is None:
                    raise TierIOError(f"block {job.block_hash:016x} left {job.source_tier}")
                header, payload = found
            store.write(job.block_hash, header, payload)
            num_bytes = len(header) + payload.numel()
            succeeded = True
        except Exception as exc:
            logger.warning(
                "KV tier %s: storing block %016x failed: %s", job.tier, job.block_hash, exc
            )
            with contextlib.suppress(Exception):  # best effort: the stack forgets it anyway
                store.delete(job.block_hash)
        self.post(
            StoreDone(job.job_id, job.tier, succeeded, num_bytes, time.perf_counter() - started_s)
        )

    def _run_drop(self, job: DropJob) -> None:
        store = self.stores[job.tier]
        if store.in_memory:
            self._wait_for_onboard_copies()
        for block_hash in job.block_hashes:
            try:
                store.delete(block_hash)
            except TierIOError as exc:
                logger.warning("KV tier %s: cannot delete a bad block: %s", job.tier, exc)

    def _device_to_host(self, block_id: int) -> torch.Tensor:
        view = self.block_view(block_id)
        if view.device.type == "cpu":
            return view  # the engine holds the block until the job is reported: stable
        stream = self._stream(view.device)
        with torch.cuda.stream(stream):
            host = view.to("cpu", non_blocking=True)
        stream.synchronize()
        return host

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._stream_lock:
            if self._cuda_stream is None:
                self._cuda_stream = torch.cuda.Stream(device=device)
            return self._cuda_stream

    # -- onboarding ------------------------------------------------------------------------------

    def _run_onboard(self, onboard: KVOnboard) -> None:
        """Read every block, queue its copy as soon as its header passes (blocks that follow
        each other on both sides go as one copy, ``CopyRun``), hash the payloads on the read
        pool while the copies run, and report twice: ``OnboardDone`` once every checksum is
        known (on a GPU the copies may still be running: its ``in_flight`` orders the engine's
        next step after them), then ``OnboardLanded`` once the bytes are all in.

        Bytes may land in a device block before their checksum is known: the block is not
        findable until ``OnboardDone`` says it loaded, and a block at or after the first
        rejected one is recomputed (overwritten) by the engine.
        """
        started_s = time.perf_counter()
        plan = list(zip(onboard.block_hashes, onboard.tiers, onboard.local_block_ids, strict=True))
        # Slow stores start reading now, on the pool; in-memory ones answer in the loop, so the
        # first copy is queued after one read, not after all of them.
        pending = [self._start_read(block_hash, tier) for block_hash, tier, _ in plan]
        reasons: list[str | None] = [None] * len(plan)
        num_bytes_by_tier: dict[str, int] = {}
        verifying = _VerifyBatches(
            self._reads, self._num_read_threads, self.verify_checksums, self._hash_elsewhere(plan)
        )
        run = CopyRun(self.max_copy_run_bytes)
        stream = self._onboard_stream(onboard)
        with torch.cuda.stream(stream):  # None (CPU pool): copies run here, in order
            for position, ((block_hash, tier, block_id), read) in enumerate(
                zip(plan, pending, strict=True)
            ):
                if read is None:
                    read = self._read_in_memory(block_hash, tier)
                if isinstance(read, Future) and not read.done():
                    run.flush()  # the copies and checksums go on while this read is awaited
                    verifying.hand_over()
                reason, found = _read_result(read, tier)
                num_bytes = 0 if found is None else found[1].numel()
                if reason is None and found is not None:
                    reason, header = self._admit(block_hash, tier, block_id, found, run)
                    if header is not None:
                        verifying.add(position, tier, header, found[1])
                reasons[position] = reason
                num_bytes_by_tier[tier] = num_bytes_by_tier.get(tier, 0) + num_bytes
            run.flush()
            admitted_s = time.perf_counter() - started_s
            in_flight = None
            if stream is not None:
                in_flight = CopiesInFlight.record(stream)
                self._track(in_flight)
        with self._count_lock:
            self.num_onboard_copies += run.num_copies
        for position, exc in verifying.failures():
            logger.warning("KV tier %s: block refused, recomputing it: %s", plan[position][1], exc)
            reasons[position] = exc.reason
        rejected = tuple((i, r) for i, r in enumerate(reasons) if r is not None)
        result = OnboardResult(
            onboard.request_id,
            rejected[0][0] if rejected else len(plan),
            rejected,
            tuple(num_bytes_by_tier.items()),
            time.perf_counter() - started_s,
        )
        self.post(OnboardDone(onboard, result, in_flight, admitted_s))
        if in_flight is not None:
            in_flight.event.synchronize()
            self._untrack(in_flight)
        self.post(
            OnboardLanded(
                onboard.request_id, result.num_bytes_by_tier, time.perf_counter() - started_s
            )
        )

    def _hash_elsewhere(self, plan: list[tuple[int, str, int]]) -> dict[str, DigestsInFlight]:
        """Start the checksums of the tiers that hash their own blocks (the host tier's helper
        processes), before the admission loop: they share no GIL with it."""
        if not self.verify_checksums:
            return {}
        started = {}
        for tier in dict.fromkeys(tier for _, tier, _ in plan):
            hashes = [block_hash for block_hash, t, _ in plan if t == tier]
            in_flight = self.stores[tier].start_checksums(hashes)
            if in_flight is not None:
                started[tier] = in_flight
        return started

    def _start_read(self, block_hash: int, tier: str) -> Future | None:
        """A read on the pool, or None for an in-memory store (``_read_in_memory`` then)."""
        store = self.stores[tier]
        if store.in_memory:
            return None
        return self._reads.submit(store.read, block_hash)

    def _read_in_memory(
        self, block_hash: int, tier: str
    ) -> tuple[bytes, torch.Tensor] | BaseException | None:
        """An in-memory store's answer, or the exception it raised (for ``_read_result``)."""
        try:
            return self.stores[tier].read(block_hash)
        except Exception as exc:
            return exc

    def _onboard_stream(self, onboard: KVOnboard) -> torch.cuda.Stream | None:
        """The side CUDA stream the copies queue on when the pool is on a GPU, else None."""
        if not onboard.local_block_ids:
            return None
        device = self.block_view(onboard.local_block_ids[0]).device
        return self._stream(device) if device.type == "cuda" else None

    # -- copies still running on the side stream ------------------------------------------------

    def _track(self, in_flight: CopiesInFlight) -> None:
        with self._count_lock:
            self._in_flight.append(in_flight)

    def _untrack(self, in_flight: CopiesInFlight) -> None:
        with self._count_lock:
            self._in_flight.remove(in_flight)

    def _wait_for_onboard_copies(self) -> None:
        """Before a host slot is overwritten or freed: the onboards still reading host memory
        end first (the stack unpins their entries as soon as their checksums are known)."""
        with self._count_lock:
            pending = list(self._in_flight)
        for in_flight in pending:
            in_flight.event.synchronize()

    def _admit(
        self,
        block_hash: int,
        tier: str,
        block_id: int,
        found: tuple[bytes, torch.Tensor],
        run: CopyRun,
    ) -> tuple[str | None, BlockHeader | None]:
        """Check one block's header and queue the copy of its bytes into the device block."""
        raw_header, payload = found
        try:
            header = BlockHeader.decode(raw_header)
            check_header(header, block_hash, self.identity)
        except BlockRejected as exc:
            logger.warning("KV tier %s: block refused, recomputing it: %s", tier, exc)
            return exc.reason, None
        dest = self.block_view(block_id)
        if dest.numel() != payload.numel():
            return "header", None
        run.add(dest, payload)
        return None, header

    # -- listing ---------------------------------------------------------------------------------

    def _list_loop(self, stores: list[KVTier]) -> None:
        while not self._closed.is_set():
            for store in stores:
                try:
                    self.post(Listed(store.name, tuple(store.list_hashes())))
                except TierIOError as exc:
                    logger.warning("KV tier %s: %s", store.name, exc)
            self._closed.wait(self._list_interval_s)


def _read_result(
    read: tuple[bytes, torch.Tensor] | BaseException | Future | None, tier: str
) -> tuple[str | None, tuple[bytes, torch.Tensor] | None]:
    """A read (an answer, an exception, or a pending read on the pool) as a reason to
    refuse the block (None: read) and the header and payload."""
    try:
        found = read.result() if isinstance(read, Future) else read
        if isinstance(found, BaseException):
            raise found
    except TierIOError as exc:
        logger.warning("KV tier %s: %s", tier, exc)
        return "io", None
    except Exception:  # a bug in a read: the block is recomputed
        logger.exception("KV tier %s: a block read failed", tier)
        return "io", None
    return (None, found) if found is not None else ("missing", None)


class _VerifyBatches:
    """Payload checksums hashed on the read pool (xxhash releases the GIL). Admitted blocks are
    held until the admitting thread would wait anyway (a read still pending, or the end), then
    handed over split one chunk per read thread: hashing threads that start while the admission
    loop still runs take the GIL back after every block and slowed it 4-6x on a GPU host.

    Blocks of a tier that hashes them itself (``elsewhere``: the host tier's helper processes,
    started with the onboard) are only compared with their headers at the end."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        num_threads: int,
        enabled: bool,
        elsewhere: dict[str, DigestsInFlight] | None = None,
    ) -> None:
        self._pool = pool
        self._num_threads = num_threads
        self._enabled = enabled
        self._held: list[tuple[int, BlockHeader, torch.Tensor]] = []
        self._futures: list[Future[list[tuple[int, BlockRejected]]]] = []
        self._elsewhere = elsewhere or {}
        self._compare: dict[str, list[tuple[int, BlockHeader, torch.Tensor]]] = {}

    def add(self, position: int, tier: str, header: BlockHeader, payload: torch.Tensor) -> None:
        if not self._enabled:
            return
        if tier in self._elsewhere:
            self._compare.setdefault(tier, []).append((position, header, payload))
        else:
            self._held.append((position, header, payload))

    def hand_over(self) -> None:
        """Start hashing what is held, in up to one chunk per read thread."""
        held, self._held = self._held, []
        chunk = max(1, -(-len(held) // self._num_threads))
        for start in range(0, len(held), chunk):
            self._futures.append(self._pool.submit(_verify_chunk, held[start : start + chunk]))

    def failures(self) -> list[tuple[int, BlockRejected]]:
        """Wait for every chunk: the blocks whose bytes are not what their header says."""
        failed = []
        for tier, items in self._compare.items():
            try:
                digests = self._elsewhere[tier].result()
            except Exception as exc:  # a helper died: hash here instead
                logger.warning("KV tier %s: checksum helpers failed (%s), hashing here", tier, exc)
                digests = {}
            for position, header, payload in items:
                digest = digests.get(header.block_hash)
                if digest is None:
                    self._held.append((position, header, payload))
                elif digest != header.checksum or payload.numel() != header.payload_bytes:
                    exc = ChecksumMismatch(f"block {header.block_hash:016x} failed its checksum")
                    failed.append((position, exc))
        self.hand_over()
        failed += [failure for future in self._futures for failure in future.result()]
        return failed


def _verify_chunk(
    items: list[tuple[int, BlockHeader, torch.Tensor]],
) -> list[tuple[int, BlockRejected]]:
    failed = []
    for position, header, payload in items:
        try:
            verify_payload(header, _bytes(payload))
        except BlockRejected as exc:
            failed.append((position, exc))
    return failed


def _bytes(payload: torch.Tensor) -> memoryview:
    """A host uint8 tensor's bytes without a copy (for hashing)."""
    return memoryview(payload.numpy()).cast("B")
