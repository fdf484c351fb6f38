"""The tiers below the device as one pure state machine: which blocks each tier holds, in what
LRU order, which copies to make, and the KV events that say so. No I/O, no threads, no clocks.

The engine thread owns a ``TierStack``; the worker's ``KVTierManager`` (or the offline
simulator) executes the jobs it plans and reports back. Life of a block::

    G1 full block --write-through--> first tier (G2, else G3, else G4)     StoreJob(source G1)
    used by >= min_uses requests ---> copied to the next tier down         StoreJob(source tier)
    tier full: least recently used, unpinned, ready block evicted          BlockRemoved(medium)
    prefix lookup: the run after the G1 hit, each block in its fastest tier; the cost check
    (policy.py) picks how many to onboard; their entries are pinned until the copy is done
    onboard found a bad block: dropped from its tier (and deleted), counted, never served

An entry is *pending* from the moment its copy is planned (it takes room, is not findable) and
*ready* once the bytes are in; ``BlockStored`` is emitted then. Entries of a shared tier (G4)
found by listing the store were written by other workers: they are findable but never evicted
or announced by this worker. Tiers hold copies (inclusive): evicting a block from one tier
leaves the others.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from serving.engine.kv_offload import KVOnboard, NewBlock
from serving.kvcache.policy import CostModel, OnboardDecision, UseCounter
from serving.kvcache.tier import TIER_MEDIA
from serving.protocol.kv_events import BlockRemoved, BlockStored, KVCacheEvent

DEFAULT_MIN_USES = 2


@dataclass(frozen=True, slots=True)
class BlockInfo:
    parent_hash: int | None
    token_ids: tuple[int, ...]


@dataclass(slots=True, eq=False)
class _Entry:
    info: BlockInfo | None  # None: found by listing a shared store
    owner: TierStack | None  # the stack that wrote it (announces it); None: listed
    ready: bool = False
    pins: int = 0


class TierIndex:
    """One tier's entries in LRU order (front = least recent). Shared by stacks for G4 in the
    simulator; capacity counts written entries only."""

    def __init__(self, name: str, capacity_blocks: int | None, shared: bool = False) -> None:
        self.name = name
        self.medium = TIER_MEDIA[name]
        self.capacity_blocks = capacity_blocks
        self.shared = shared
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.num_owned = 0
        self.refused: set[int] = set()  # another model's blocks: never looked at again

    def ready_entry(self, block_hash: int) -> _Entry | None:
        entry = self.entries.get(block_hash)
        return entry if entry is not None and entry.ready else None

    def victims(self, num_blocks: int) -> list[int] | None:
        """Least recently used evictable hashes making room for ``num_blocks``; None: no room."""
        if self.capacity_blocks is None:
            return []
        need = self.num_owned + num_blocks - self.capacity_blocks
        out: list[int] = []
        if need <= 0:
            return out
        for block_hash, entry in self.entries.items():
            if entry.owner is not None and entry.ready and not entry.pins:
                out.append(block_hash)
                if len(out) == need:
                    return out
        return None


@dataclass(frozen=True, slots=True)
class StoreJob:
    """Copy one block into ``tier``: first delete ``evict_hashes`` there, then write it.

    The bytes come from device block ``source_block_id`` (``source_tier`` "G1") or from the
    block's entry in ``source_tier`` (pinned until the job is reported).
    """

    job_id: int
    tier: str
    block_hash: int
    info: BlockInfo
    source_tier: str
    source_block_id: int | None
    evict_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DropJob:
    """Delete blocks that failed their checks from ``tier``'s store."""

    tier: str
    block_hashes: tuple[int, ...]


TierJob = StoreJob | DropJob


@dataclass(frozen=True, slots=True)
class TierLookup:
    """Where a request's prefix continues below G1, and the cost check's decision."""

    block_hashes: tuple[int, ...]  # the request's prompt block hashes (capped)
    num_g1_blocks: int
    run_tiers: tuple[str, ...]  # tier of each lower-tier block after the G1 hit
    decision: OnboardDecision

    @property
    def num_onboard_blocks(self) -> int:
        return self.decision.num_blocks

    def onboard_hashes(self) -> tuple[int, ...]:
        start = self.num_g1_blocks
        return self.block_hashes[start : start + self.decision.num_blocks]


@dataclass(frozen=True, slots=True)
class OnboardResult:
    """What an onboard copy did: ``num_loaded_blocks`` leading blocks landed; ``rejected`` are
    (index in the plan, reason) for blocks that failed (checksum | foreign | header | missing |
    io)."""

    request_id: str
    num_loaded_blocks: int
    rejected: tuple[tuple[int, str], ...] = ()
    num_bytes_by_tier: tuple[tuple[str, int], ...] = ()
    duration_s: float = 0.0


@dataclass
class TierStats:
    """Counters since the last ``take_stats`` (the worker's metrics add them up)."""

    lookup_blocks: int = 0
    hit_blocks: Counter[str] = field(default_factory=Counter)
    onboarded_blocks: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)  # onboard | recompute
    estimates: list[tuple[float, float]] = field(default_factory=list)  # (onboard_s, recompute_s)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tier, reason)
    stored_blocks: Counter[str] = field(default_factory=Counter)
    failed_stores: Counter[str] = field(default_factory=Counter)
    skipped_stores: Counter[str] = field(default_factory=Counter)  # no evictable room
    evicted_blocks: Counter[str] = field(default_factory=Counter)


class TierStack:
    """Owns the lower tiers' indexes, the use counts and the cost model; emits KV events.

    ``tiers`` are fastest first (a subset of G2, G3, G4). The first tier takes every new device
    block (write-through); each deeper tier takes a copy of a block once ``min_uses`` requests
    used it. Not thread-safe: one owner thread.
    """

    def __init__(
        self,
        tiers: Sequence[TierIndex],
        cost: CostModel,
        *,
        min_uses: int = DEFAULT_MIN_USES,
        emit: Callable[[KVCacheEvent], None] | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a tier stack needs at least one tier")
        self.tiers = list(tiers)
        self.by_name = {t.name: t for t in self.tiers}
        self.cost = cost
        self.block_size = cost.block_size
        self.min_uses = min_uses
        self.uses = UseCounter()
        self._events: list[KVCacheEvent] = []
        self.emit: Callable[[KVCacheEvent], None] = emit or self._events.append
        self._jobs: dict[int, tuple[StoreJob, _Entry]] = {}
        self._outbox: list[TierJob] = []
        self._job_ids = itertools.count()
        self._stats = TierStats()

    # -- the scheduler's hook -----------------------------------------------------------------

    def lookup(self, block_hashes: Sequence[int], num_g1_blocks: int) -> TierLookup:
        """The run of blocks after the G1 hit found below G1, and the cost check on it."""
        run: list[str] = []
        for block_hash in block_hashes[num_g1_blocks:]:
            tier = self._fastest(block_hash)
            if tier is None:
                break
            run.append(tier.name)
        decision = self.cost.decide(run)
        return TierLookup(tuple(block_hashes), num_g1_blocks, tuple(run), decision)

    def commit(self, lookup: TierLookup, onboard: KVOnboard | None) -> None:
        """The request was admitted (onboarding ``onboard``, or recomputing): count it, pin
        what will be read, refresh LRU order, and copy down blocks that became hot."""
        stats = self._stats
        stats.lookup_blocks += len(lookup.block_hashes) - lookup.num_g1_blocks
        stats.hit_blocks.update(lookup.run_tiers)
        if lookup.run_tiers:
            stats.decisions["onboard" if onboard is not None else "recompute"] += 1
            d = lookup.decision
            stats.estimates.append((d.est_onboard_s, d.est_recompute_s))
        self.uses.add(lookup.block_hashes)
        if onboard is not None:
            for block_hash, tier in zip(onboard.block_hashes, onboard.tiers, strict=True):
                index = self.by_name[tier]
                entry = index.entries[block_hash]
                entry.pins += 1
                index.entries.move_to_end(block_hash)
        for block_hash in lookup.block_hashes:
            for index in self.tiers:
                if block_hash in index.entries:
                    index.entries.move_to_end(block_hash)
            self._maybe_copy_down(block_hash)

    # -- the engine core ------------------------------------------------------------------------

    def on_blocks_computed(self, blocks: Sequence[NewBlock]) -> list[int]:
        """Plan write-through copies of new device blocks; returns the device block ids the
        engine must hold until each job is reported (``finish_store``)."""
        first = self.tiers[0]
        held: list[int] = []
        for block in blocks:
            if block.block_hash in first.entries:
                first.entries.move_to_end(block.block_hash)
                continue
            info = BlockInfo(block.parent_hash, tuple(block.token_ids))
            if self._plan_store(first, block.block_hash, info, "G1", block.block_id):
                held.append(block.block_id)
        return held

    def finish_store(self, job_id: int, succeeded: bool) -> int | None:
        """A store job ended; returns the device block id to release (G1 source), if any."""
        job, entry = self._jobs.pop(job_id)
        if job.source_tier != "G1":
            self._unpin(job.source_tier, job.block_hash)
        index = self.by_name[job.tier]
        if index.entries.get(job.block_hash) is entry:
            if succeeded:
                entry.ready = True
                self._stats.stored_blocks[job.tier] += 1
                self._announce_stored(index, job.block_hash, entry)
                self._maybe_copy_down(job.block_hash)
            else:
                self._stats.failed_stores[job.tier] += 1
                self._forget(index, job.block_hash, entry)
        return job.source_block_id

    def finish_onboard(self, onboard: KVOnboard, result: OnboardResult) -> None:
        """Unpin an onboard's entries; drop (and count) the blocks that failed their checks."""
        for block_hash, tier in zip(onboard.block_hashes, onboard.tiers, strict=True):
            self._unpin(tier, block_hash)
        self._stats.onboarded_blocks.update(onboard.tiers[: result.num_loaded_blocks])
        drops: dict[str, list[int]] = {}
        for position, reason in result.rejected:
            block_hash, tier = onboard.block_hashes[position], onboard.tiers[position]
            if reason == "io":
                continue  # the store could not be reached: the block may be fine
            index = self.by_name[tier]
            entry = index.entries.get(block_hash)
            if reason != "missing":
                self._stats.rejected[(tier, reason)] += 1
            if reason == "foreign":
                index.refused.add(block_hash)  # another model's block: leave its bytes alone
            elif reason != "missing":
                drops.setdefault(tier, []).append(block_hash)
            if entry is not None:
                self._forget(index, block_hash, entry)
        for tier, hashes in drops.items():
            self._outbox.append(DropJob(tier, tuple(hashes)))

    def apply_listing(self, tier: str, block_hashes: Iterable[int]) -> None:
        """A shared store's listing: other workers' blocks become findable, vanished ones go."""
        index = self.by_name[tier]
        listed = set(block_hashes) - index.refused
        for block_hash in listed:
            if block_hash not in index.entries:
                index.entries[block_hash] = _Entry(None, None, ready=True)
                index.entries.move_to_end(block_hash, last=False)
        for block_hash, entry in list(index.entries.items()):
            if entry.owner is None and block_hash not in listed and not entry.pins:
                del index.entries[block_hash]

    def take_jobs(self) -> list[TierJob]:
        jobs, self._outbox = self._outbox, []
        return jobs

    def take_events(self) -> list[KVCacheEvent]:
        """Events, when no ``emit`` sink was given (the engine core passes its block pool's)."""
        events, self._events = self._events, []
        return events

    def take_stats(self) -> TierStats:
        stats, self._stats = self._stats, TierStats()
        return stats

    @property
    def num_jobs_in_flight(self) -> int:
        return len(self._jobs)

    def held_hashes(self, tier: str, *, owned_only: bool = True) -> set[int]:
        """Ready blocks of a tier (this worker's own writes unless ``owned_only`` is False)."""
        index = self.by_name[tier]
        return {
            h
            for h, e in index.entries.items()
            if e.ready and (e.owner is self or (not owned_only and h not in index.refused))
        }

    def used_blocks(self, tier: str) -> int:
        return len(self.by_name[tier].entries)

    # -- internals -------------------------------------------------------------------------------

    def _fastest(self, block_hash: int) -> TierIndex | None:
        for index in self.tiers:
            if index.ready_entry(block_hash) is not None and block_hash not in index.refused:
                return index
        return None

    def _maybe_copy_down(self, block_hash: int) -> None:
        """Copy a block one tier further down once it passes that tier's filter."""
        source: TierIndex | None = None
        for index in self.tiers:
            entry = index.entries.get(block_hash)
            if entry is not None:
                if entry.ready and entry.info is not None and source is None:
                    source = index
                continue
            if source is None:
                return
            if self.uses.get(block_hash) < self.min_uses:
                return
            source_entry = source.entries[block_hash]
            assert source_entry.info is not None
            if self._plan_store(index, block_hash, source_entry.info, source.name, None):
                source_entry.pins += 1
            return

    def _plan_store(
        self,
        index: TierIndex,
        block_hash: int,
        info: BlockInfo,
        source_tier: str,
        source_block_id: int | None,
    ) -> bool:
        if block_hash in index.refused:
            return False  # another model's block under this name: never overwrite it
        victims = index.victims(1)
        if victims is None:
            self._stats.skipped_stores[index.name] += 1
            return False
        for victim in victims:
            self._stats.evicted_blocks[index.name] += 1
            self._forget(index, victim, index.entries[victim])
        entry = _Entry(info, self)
        index.entries[block_hash] = entry
        index.num_owned += 1
        job = StoreJob(
            next(self._job_ids), index.name, block_hash, info, source_tier, source_block_id,
            tuple(victims),
        )  # fmt: skip
        self._jobs[job.job_id] = (job, entry)
        self._outbox.append(job)
        return True

    def _forget(self, index: TierIndex, block_hash: int, entry: _Entry) -> None:
        """Remove an entry from the index (announcing it if it was announced)."""
        del index.entries[block_hash]
        if entry.owner is not None:
            index.num_owned -= 1
            if entry.ready:
                entry.owner.emit(BlockRemoved(block_hashes=[block_hash], medium=index.medium))

    def _announce_stored(self, index: TierIndex, block_hash: int, entry: _Entry) -> None:
        assert entry.info is not None and entry.owner is not None
        entry.owner.emit(
            BlockStored(
                block_hashes=[block_hash],
                parent_block_hash=entry.info.parent_hash,
                token_ids=list(entry.info.token_ids),
                block_size=self.block_size,
                medium=index.medium,
            )
        )

    def _unpin(self, tier: str, block_hash: int) -> None:
        entry = self.by_name[tier].entries.get(block_hash)
        if entry is not None and entry.pins:
            entry.pins -= 1
