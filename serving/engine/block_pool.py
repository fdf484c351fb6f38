"""The pool of KV-cache blocks: free list, reference counts, prefix-cache index, KV events."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from serving.engine.kv_offload import NewBlock
from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
)

# vLLM calls the device tier "GPU"; Strata's G1 tier keeps that name on every device so one
# router scores CPU-hosted and GPU-hosted workers alike.
DEVICE_MEDIUM = "GPU"


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of ``block_size`` token slots in the device KV cache."""

    block_id: int
    ref_cnt: int = 0
    # Chained hash of the block's tokens once the block is full and cached; None otherwise.
    block_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Owns free blocks, ref counts and the hash index; records KV events. No I/O.

    Free blocks sit in LRU order: allocation takes from the front, freeing appends to the back,
    so a freed block keeps its cached contents (and stays findable by hash) until it is the
    least recently freed one and gets reused; then it is evicted and a ``BlockRemoved`` event
    is recorded.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self._hash_to_block: dict[int, KVCacheBlock] = {}
        self._events: list[KVCacheEvent] = []
        # Blocks indexed since the last take, for lower KV tiers; None: nobody asks.
        self._new_blocks: list[NewBlock] | None = None

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests (0..1); free cached blocks count as free."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash (in use or free)."""
        return len(self._hash_to_block)

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self._hash_to_block.get(block_hash)

    def cached_block_hashes(self) -> set[int]:
        return set(self._hash_to_block)

    # -- allocation ------------------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` from the free list (evicting their cached contents)."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot get {num_blocks} free blocks, only {len(self._free)} free")
        out: list[KVCacheBlock] = []
        evicted: list[int] = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._hash_to_block.get(block.block_hash) is block:
                    del self._hash_to_block[block.block_hash]
                    evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        if evicted:
            self._events.append(BlockRemoved(block_hashes=evicted, medium=DEVICE_MEDIUM))
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cached blocks a new request reuses."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the free list.

        Pass a request's blocks tail-first so its last blocks are evicted before its prefix.
        """
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        num_cached_blocks: int,
        num_full_blocks: int,
    ) -> None:
        """Index blocks ``[num_cached_blocks, num_full_blocks)`` of a request by hash.

        ``token_ids`` is the request's token sequence (at least ``num_full_blocks`` blocks long).
        A block whose hash is already indexed (another request computed the same prefix in
        parallel) stays unindexed: the first copy wins.
        """
        if not self.enable_caching or num_full_blocks <= num_cached_blocks:
            return
        run_start: int | None = None  # first block of the run of newly indexed blocks
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            block_hash = block_hashes[i]
            newly_indexed = block.block_hash is None and block_hash not in self._hash_to_block
            if newly_indexed:
                block.block_hash = block_hash
                self._hash_to_block[block_hash] = block
                if self._new_blocks is not None:
                    bs = self.block_size
                    self._new_blocks.append(
                        NewBlock(
                            block.block_id,
                            block_hash,
                            block_hashes[i - 1] if i > 0 else None,
                            tuple(token_ids[i * bs : (i + 1) * bs]),
                        )
                    )
                if run_start is None:
                    run_start = i
            elif run_start is not None:
                self._record_stored(block_hashes, token_ids, run_start, i)
                run_start = None
        if run_start is not None:
            self._record_stored(block_hashes, token_ids, run_start, num_full_blocks)

    def _record_stored(
        self, block_hashes: Sequence[int], token_ids: Sequence[int], start: int, end: int
    ) -> None:
        """One ``BlockStored`` for the contiguous run of blocks ``[start, end)``."""
        self._events.append(
            BlockStored(
                block_hashes=list(block_hashes[start:end]),
                parent_block_hash=block_hashes[start - 1] if start > 0 else None,
                token_ids=list(token_ids[start * self.block_size : end * self.block_size]),
                block_size=self.block_size,
                medium=DEVICE_MEDIUM,
            )
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no request holds a block."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        if self._new_blocks is None:
            self._events.append(AllBlocksCleared())
        elif self._hash_to_block:  # lower tiers keep their blocks: clear only this medium
            self._events.append(
                BlockRemoved(block_hashes=list(self._hash_to_block), medium=DEVICE_MEDIUM)
            )
        self._hash_to_block.clear()
        return True

    def take_events(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events

    def record_event(self, event: KVCacheEvent) -> None:
        """Queue an event of another tier in order with this pool's own (one stream)."""
        self._events.append(event)

    def track_new_blocks(self) -> None:
        """From now on, remember blocks as they get indexed (``take_new_blocks``)."""
        if self._new_blocks is None:
            self._new_blocks = []

    def take_new_blocks(self) -> list[NewBlock]:
        """Blocks indexed since the last call (full, and computed once their step ran)."""
        if not self._new_blocks:
            return []
        blocks, self._new_blocks = self._new_blocks, []
        return blocks
