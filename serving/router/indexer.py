"""The router's KV index: which workers hold which prefix of a request, per tier; no I/O.

Workers report blocks with vLLM KV events. Engine block hashes are opaque per-worker ids: the
index recomputes its own chained hashes from each ``BlockStored``'s token ids (see
``serving/protocol/block_hash.py``) and keeps engine hashes only to find a block's parent and to
apply removals. Since the chain hash at position ``i`` encodes the whole prefix ``0..i``, a flat
map from chain hash to holders is a prefix tree::

    request blocks      h0       h1       h2       h3
    GPU holders        {A,B}    {A}      {A}      -
    CPU holders        {}       {B}      {}       -
    -> A: 3 blocks on GPU; B: 1 on GPU + 1 on CPU; the match stops at h3 for everyone
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
import xxhash

from serving.protocol.block_hash import HASH_SEED, salt_for
from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVEventBatch,
)

DEFAULT_MEDIUM = "GPU"  # vLLM's meaning of an event without a medium
# Fastest first: a block held in several tiers counts in the first one listed.
DEFAULT_MEDIUM_ORDER = ("GPU", "CPU", "DISK", "S3")
# Tiers every worker of the model reads: a block there is a hit for all workers.
DEFAULT_SHARED_MEDIA = frozenset({"S3"})

_U32_TYPECODE = next(code for code in ("I", "L") if array(code).itemsize == 4)
_pack_chain = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest
_encode_keys = msgspec.msgpack.Encoder().encode


class InvalidKVEvent(ValueError):
    """A KV event that contradicts itself or the index (token count, block size)."""


def hash_token_ids(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None, salt: int = 0
) -> list[int]:
    """Chained hashes of every full block; equal to ``block_hash.hash_token_blocks``.

    Encodes all tokens once and hashes slices of one buffer (about 2x faster on long prompts).
    """
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    encoded = array(_U32_TYPECODE, token_ids[: num_blocks * block_size])
    if sys.byteorder != "little":
        encoded.byteswap()
    data = memoryview(encoded).cast("B")
    block_bytes = block_size * 4
    prev = salt if parent_hash is None else parent_hash
    hashes: list[int] = []
    for start in range(0, num_blocks * block_bytes, block_bytes):
        local = _xxh3(data[start : start + block_bytes], HASH_SEED)
        prev = _xxh3(_pack_chain(prev, local), HASH_SEED)
        hashes.append(prev)
    return hashes


def mix_extra_keys(parent_hash: int, keys: Sequence[object]) -> int:
    """The chain value a block with extra hash keys continues from (see the module docstring)."""
    return _xxh3(_pack_chain(parent_hash, _xxh3(_encode_keys(list(keys)), HASH_SEED)), HASH_SEED)


def _salting_keys(event: BlockStored) -> list[list[object] | None] | None:
    """Per block, the extra keys beyond the LoRA name (which salts the root); None if none."""
    extra = event.extra_keys
    if not extra or not isinstance(extra, list):
        return None
    skip = 1 if event.lora_name else 0
    keys = [list(k[skip:]) if k and len(k) > skip else None for k in extra]
    return keys if any(keys) else None


def cached_prompt_tokens(num_cached_blocks: int, block_size: int, num_prompt_tokens: int) -> int:
    """Prompt tokens a worker reuses from ``num_cached_blocks`` leading cached blocks.

    The last prompt token is always computed (its logits give the first output token), and
    vLLM reuses whole blocks only: ``min(blocks, (prompt - 1) // block_size) * block_size``.
    """
    usable_blocks = max(num_prompt_tokens - 1, 0) // block_size
    return min(num_cached_blocks, usable_blocks) * block_size


@dataclass(frozen=True)
class PrefixMatches:
    """Per worker, the blocks of the longest cached prefix of a request, by tier.

    A worker's prefix runs while every block is held in some tier; each block counts in the
    fastest tier holding it. Workers that hold no leading block are absent.
    """

    worker_to_medium_blocks: dict[str, dict[str, int]] = field(default_factory=dict)

    def num_blocks(self, worker_id: str) -> int:
        return sum(self.worker_to_medium_blocks.get(worker_id, {}).values())

    def medium_blocks(self, worker_id: str) -> dict[str, int]:
        return self.worker_to_medium_blocks.get(worker_id, {})


Slots = tuple[int, ...]  # one int per medium slot


def _set_slot(values: Slots, slot: int, value: int) -> Slots:
    """``values`` with ``values[slot] = value``, padded with zeros as needed."""
    if slot >= len(values):
        values = values + (0,) * (slot + 1 - len(values))
    return (*values[:slot], value, *values[slot + 1 :])


class _WorkerBlocks:
    """One worker's engine blocks and, per router hash, how many engine blocks per medium.

    Values are int tuples, not objects: the garbage collector stops tracking them, which
    halves ingest time at 100k blocks.
    """

    __slots__ = ("bit", "engine_to_block", "router_refs")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        # engine hash -> (router hash, bitmask of the medium slots holding it)
        self.engine_to_block: dict[BlockHash, tuple[int, int]] = {}
        self.router_refs: dict[int, Slots] = {}  # router hash -> engine blocks per medium slot


class KVIndexer:
    """Owns the chain-hash -> holders map for one pool (one block size); no I/O, no clocks.

    ``_index[router_hash][medium_slot]`` is a bitmask of worker slots. Not thread-safe: the
    caller serializes event application and queries (e.g. on one event loop).
    """

    def __init__(
        self,
        block_size: int,
        medium_order: Sequence[str] = DEFAULT_MEDIUM_ORDER,
        shared_media: Iterable[str] = DEFAULT_SHARED_MEDIA,
        kv_group_idx: int = 0,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.kv_group_idx = kv_group_idx
        self._medium_order = tuple(medium_order)
        self._shared_media = frozenset(shared_media)
        self._index: dict[int, Slots] = {}
        self._media: list[str] = []  # medium slot -> name
        self._medium_to_slot: dict[str, int] = {}
        self._slots_by_rank: list[int] = []
        self._shared_slots: list[int] = []
        self._workers: dict[str, _WorkerBlocks] = {}
        self._slot_to_worker: list[str | None] = []
        self._all_workers_mask = 0
        self.num_orphan_blocks = 0  # stored under a parent the index does not know: skipped
        self.num_unknown_removals = 0
        self.num_rejected_events = 0
        self.num_partial_blocks = 0  # shorter than a block (vLLM's hybrid tail caching): skipped
        self.num_other_group_events = 0  # another KV-cache group's events: skipped

    # Workers

    def add_worker(self, worker_id: str) -> None:
        """Make a worker known (it then gets hits from shared tiers); idempotent."""
        if worker_id in self._workers:
            return
        try:
            slot = self._slot_to_worker.index(None)
            self._slot_to_worker[slot] = worker_id
        except ValueError:
            slot = len(self._slot_to_worker)
            self._slot_to_worker.append(worker_id)
        self._workers[worker_id] = _WorkerBlocks(1 << slot)
        self._all_workers_mask |= 1 << slot

    def remove_worker(self, worker_id: str) -> None:
        """Drop the worker and every block it holds; unknown workers are ignored."""
        if worker_id not in self._workers:
            return
        self._clear_worker(worker_id)
        worker = self._workers.pop(worker_id)
        self._all_workers_mask &= ~worker.bit
        self._slot_to_worker[worker.bit.bit_length() - 1] = None

    def worker_ids(self) -> list[str]:
        return list(self._workers)

    def __len__(self) -> int:
        """Distinct router blocks held by some worker in some tier."""
        return len(self._index)

    def num_blocks(self, worker_id: str, medium: str | None = None) -> int:
        """Distinct router blocks the worker holds, in ``medium`` or in any tier."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return 0
        if medium is None:
            return len(worker.router_refs)
        slot = self._medium_to_slot.get(medium)
        if slot is None:
            return 0
        return sum(1 for refs in worker.router_refs.values() if slot < len(refs) and refs[slot])

    def held_blocks(self, worker_id: str) -> dict[str, frozenset[int]]:
        """Router hashes the worker holds, per medium (for inspection and tests)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return {}
        out: dict[str, set[int]] = {}
        for router_hash, refs in worker.router_refs.items():
            for slot, count in enumerate(refs):
                if count:
                    out.setdefault(self._media[slot], set()).add(router_hash)
        return {medium: frozenset(hashes) for medium, hashes in out.items()}

    # Events

    def apply_batch(self, worker_id: str, batch: KVEventBatch) -> None:
        self.apply_events(worker_id, batch.events)

    def apply_events(self, worker_id: str, events: Iterable[KVCacheEvent]) -> None:
        """Apply events in order; an invalid one is skipped and counted in
        ``num_rejected_events``."""
        for event in events:
            try:
                self.apply_event(worker_id, event)
            except InvalidKVEvent:
                self.num_rejected_events += 1

    def apply_event(self, worker_id: str, event: KVCacheEvent) -> None:
        """Apply one event; raises ``InvalidKVEvent`` (index unchanged) on a bad one."""
        self.add_worker(worker_id)
        if isinstance(event, BlockStored):
            self._store(self._workers[worker_id], event)
        elif isinstance(event, BlockRemoved):
            self._remove(self._workers[worker_id], event)
        elif isinstance(event, AllBlocksCleared):
            self._clear_worker(worker_id)
        else:
            raise TypeError(f"not a KV cache event: {event!r}")

    # Queries

    def hash_request(
        self, token_ids: Sequence[int], lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[int]:
        """Router chain hashes of the full blocks of a prompt (vLLM's ``cache_salt`` salts the
        first block, as in vLLM's own hashes)."""
        root = salt_for(lora_name)
        if not cache_salt:
            return hash_token_ids(token_ids, self.block_size, salt=root)
        first = hash_token_ids(token_ids[: self.block_size], self.block_size,
                               mix_extra_keys(root, [cache_salt]))  # fmt: skip
        if not first:
            return []
        return first + hash_token_ids(token_ids[self.block_size :], self.block_size, first[0])

    def find_matches(self, block_hashes: Sequence[int]) -> PrefixMatches:
        """Longest cached prefix of ``block_hashes`` per worker, by tier.

        NOTE: the walk stops at the first block no remaining worker holds, and it only does
        per-worker work where the holders change, so a request costs one dict lookup per
        matched block plus a little per change of holders.
        """
        runs: list[tuple[Slots, int, int]] = []  # (holder masks, active workers, num blocks)
        run_masks: Slots | None = None
        run_active = self._all_workers_mask
        run_start = 0
        end = len(block_hashes)
        get = self._index.get
        for pos, block_hash in enumerate(block_hashes):
            masks = get(block_hash)
            if masks is None:
                end = pos
                break
            if masks != run_masks:
                if run_masks is not None:
                    runs.append((run_masks, run_active, pos - run_start))
                run_active &= self._holders(masks)
                run_masks, run_start = masks, pos
                if not run_active:
                    run_masks, end = None, pos
                    break
        if run_masks is not None:
            runs.append((run_masks, run_active, end - run_start))
        return PrefixMatches(self._count_runs(runs))

    # Internals

    def _holders(self, masks: Slots) -> int:
        holders = 0
        for mask in masks:
            holders |= mask
        for slot in self._shared_slots:
            if slot < len(masks) and masks[slot]:
                return self._all_workers_mask
        return holders

    def _count_runs(self, runs: list[tuple[Slots, int, int]]) -> dict[str, dict[str, int]]:
        """Credit each run's blocks to each active worker's fastest tier holding them."""
        out: dict[str, dict[str, int]] = {}
        for masks, active, num_blocks in runs:
            covered = 0
            for slot in self._slots_by_rank:
                if slot >= len(masks) or not masks[slot]:
                    continue
                mask = self._all_workers_mask if slot in self._shared_slots else masks[slot]
                best = mask & active & ~covered
                covered |= mask
                medium = self._media[slot]
                while best:
                    low_bit = best & -best
                    best ^= low_bit
                    worker_id = self._slot_to_worker[low_bit.bit_length() - 1]
                    assert worker_id is not None
                    per_medium = out.setdefault(worker_id, {})
                    per_medium[medium] = per_medium.get(medium, 0) + num_blocks
        return out

    def _medium_slot(self, medium: str | None) -> int:
        name = medium or DEFAULT_MEDIUM
        slot = self._medium_to_slot.get(name)
        if slot is not None:
            return slot
        slot = len(self._media)
        self._media.append(name)
        self._medium_to_slot[name] = slot
        order = {m: i for i, m in enumerate(self._medium_order)}
        self._slots_by_rank = sorted(
            range(len(self._media)), key=lambda s: (order.get(self._media[s], len(order)), s)
        )
        if name in self._shared_media:
            self._shared_slots.append(slot)
        return slot

    def _is_other_group(self, group_idx: object) -> bool:
        if group_idx is None or not isinstance(group_idx, int) or group_idx == self.kv_group_idx:
            return False
        self.num_other_group_events += 1
        return True

    def _store(self, worker: _WorkerBlocks, event: BlockStored) -> None:
        num_blocks = len(event.block_hashes)
        if self._is_other_group(event.group_idx):
            return
        if event.block_size != self.block_size:
            if num_blocks == 1 and len(event.token_ids) == event.block_size < self.block_size:
                self.num_partial_blocks += 1
                return
            raise InvalidKVEvent(
                f"BlockStored block_size {event.block_size} != the pool's {self.block_size}"
            )
        if len(event.token_ids) != num_blocks * self.block_size:
            raise InvalidKVEvent(
                f"BlockStored has {len(event.token_ids)} token ids for {num_blocks} blocks "
                f"of {self.block_size}"
            )
        if event.parent_block_hash is None:
            parent_router_hash = salt_for(event.lora_name)
        else:
            parent = worker.engine_to_block.get(event.parent_block_hash)
            if parent is None:
                self.num_orphan_blocks += num_blocks
                return
            parent_router_hash = parent[0]
        slot = self._medium_slot(event.medium)
        slot_bit = 1 << slot
        router_hashes = self._router_hashes(event, parent_router_hash)
        engine_to_block = worker.engine_to_block
        for engine_hash, router_hash in zip(event.block_hashes, router_hashes, strict=True):
            held = engine_to_block.get(engine_hash)
            media_mask = 0
            if held is not None:
                if held[0] == router_hash:
                    media_mask = held[1]
                else:
                    self._drop_engine_block(worker, engine_hash)  # engine reused the hash
            if media_mask & slot_bit:
                continue  # stored again in the same tier (e.g. a replayed batch)
            engine_to_block[engine_hash] = (router_hash, media_mask | slot_bit)
            self._add_ref(worker, router_hash, slot)

    def _router_hashes(self, event: BlockStored, parent_router_hash: int) -> list[int]:
        keys = _salting_keys(event)
        if keys is None:
            return hash_token_ids(event.token_ids, self.block_size, parent_router_hash)
        if len(keys) != len(event.block_hashes):
            raise InvalidKVEvent(
                f"BlockStored has {len(keys)} extra_keys entries for "
                f"{len(event.block_hashes)} blocks"
            )
        hashes: list[int] = []
        prev = parent_router_hash
        size = self.block_size
        for i, block_keys in enumerate(keys):
            if block_keys:
                prev = mix_extra_keys(prev, block_keys)
            (prev,) = hash_token_ids(event.token_ids[i * size : (i + 1) * size], size, prev)
            hashes.append(prev)
        return hashes

    def _remove(self, worker: _WorkerBlocks, event: BlockRemoved) -> None:
        if self._is_other_group(event.group_idx):
            return
        slot = self._medium_slot(event.medium)
        slot_bit = 1 << slot
        for engine_hash in event.block_hashes:
            held = worker.engine_to_block.get(engine_hash)
            if held is None or not held[1] & slot_bit:
                self.num_unknown_removals += 1
                continue
            router_hash, media_mask = held[0], held[1] & ~slot_bit
            if media_mask:
                worker.engine_to_block[engine_hash] = (router_hash, media_mask)
            else:
                del worker.engine_to_block[engine_hash]
            self._release_ref(worker, router_hash, slot)

    def _clear_worker(self, worker_id: str) -> None:
        worker = self._workers[worker_id]
        for router_hash, refs in worker.router_refs.items():
            for slot, count in enumerate(refs):
                if count:
                    self._unset_holder(router_hash, slot, worker.bit)
        worker.engine_to_block.clear()
        worker.router_refs.clear()

    def _drop_engine_block(self, worker: _WorkerBlocks, engine_hash: BlockHash) -> None:
        router_hash, media_mask = worker.engine_to_block.pop(engine_hash)
        for slot in range(media_mask.bit_length()):
            if media_mask & (1 << slot):
                self._release_ref(worker, router_hash, slot)

    def _add_ref(self, worker: _WorkerBlocks, router_hash: int, slot: int) -> None:
        refs = worker.router_refs.get(router_hash, ())
        count = refs[slot] if slot < len(refs) else 0
        worker.router_refs[router_hash] = _set_slot(refs, slot, count + 1)
        if count:
            return  # another engine block of this worker holds the same tokens in this tier
        masks = self._index.get(router_hash, ())
        mask = masks[slot] if slot < len(masks) else 0
        self._index[router_hash] = _set_slot(masks, slot, mask | worker.bit)

    def _release_ref(self, worker: _WorkerBlocks, router_hash: int, slot: int) -> None:
        refs = worker.router_refs[router_hash]
        refs = _set_slot(refs, slot, refs[slot] - 1)
        if any(refs):
            worker.router_refs[router_hash] = refs
        else:
            del worker.router_refs[router_hash]
        if not refs[slot]:
            self._unset_holder(router_hash, slot, worker.bit)

    def _unset_holder(self, router_hash: int, slot: int, worker_bit: int) -> None:
        masks = self._index[router_hash]
        masks = _set_slot(masks, slot, masks[slot] & ~worker_bit)
        if any(masks):
            self._index[router_hash] = masks
        else:
            del self._index[router_hash]
