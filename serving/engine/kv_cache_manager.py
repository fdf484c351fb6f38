"""Per-request block tables over the block pool, with prefix caching. No I/O, no torch."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from serving.engine.block_pool import BlockPool, KVCacheBlock
from serving.engine.request import Request
from serving.protocol.block_hash import hash_token_blocks
from serving.protocol.kv_events import KVCacheEvent


@dataclass(slots=True)
class KVCacheBlocks:
    """The interface the scheduler sees: an ordered run of blocks, never the pool itself."""

    blocks: list[KVCacheBlock] = field(default_factory=list)

    def get_block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass(slots=True)
class PrefixCacheStats:
    """Token counts since the last ``take``: prompt tokens looked up, and found cached."""

    queries: int = 0
    hits: int = 0


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class KVCacheManager:
    """Maps each request to its blocks and finds cached prefixes.

    Invariant: request ``r`` holds ``cdiv(r.num_computed_tokens + scheduled, block_size)``
    blocks, its first ``num_cached_blocks[r]`` blocks are indexed by hash, and every indexed
    block holds exactly the tokens its hash names.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, block_size, enable_caching)
        self.req_to_blocks: defaultdict[str, list[KVCacheBlock]] = defaultdict(list)
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """Longest cached prefix of ``request``: (blocks, number of tokens they hold).

        At least one token is always left to compute, since its logits give the next token.
        """
        if not self.enable_caching:
            return KVCacheBlocks(), 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        self._update_block_hashes(request, max_hit_blocks)
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return KVCacheBlocks(hits), len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_stats.queries += num_tokens
        self.prefix_cache_stats.hits += num_hit_tokens

    def take_prefix_cache_stats(self) -> PrefixCacheStats:
        stats, self.prefix_cache_stats = self.prefix_cache_stats, PrefixCacheStats()
        return stats

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: KVCacheBlocks | None = None,
        *,
        cache_blocks: bool = True,
    ) -> KVCacheBlocks | None:
        """Give ``request`` room for ``num_new_tokens`` more tokens, or return None.

        Blocks (``|`` = block boundary, ``c`` computed, ``h`` prefix-cache hit, ``n`` new)::

            | c c c c | c c h h | h h n n | n n _ _ |
              owned     owned    hits      new blocks

        ``new_computed_blocks`` are prefix-cache hits for a request not yet scheduled; they
        count as computed. On success the blocks that become full are indexed by hash (and
        announced as ``BlockStored``) and the newly added blocks are returned. None means the
        pool is too small right now: nothing changed, and the caller preempts or waits.

        ``cache_blocks=False`` allocates without indexing: for blocks whose KV arrives from
        elsewhere (a remote prefill pull) and must not be found by other requests before it
        has landed. A later call indexes them once they count as computed.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be > 0, got {num_new_tokens}")
        hits = new_computed_blocks.blocks if new_computed_blocks else []
        req_blocks = self.req_to_blocks[request.request_id]
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_required - len(req_blocks) - len(hits)
        # Hits with no other user sit in the free list: touching them takes them out of it.
        num_evictable_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_evictable_hits:
            if not req_blocks:
                del self.req_to_blocks[request.request_id]
            return None

        if hits:
            self.block_pool.touch(hits)
            req_blocks.extend(hits)
            self.num_cached_blocks[request.request_id] = len(req_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        req_blocks.extend(new_blocks)

        if self.enable_caching and cache_blocks:
            num_full = (num_computed + num_new_tokens) // self.block_size
            num_cached = self.num_cached_blocks.get(request.request_id, 0)
            if num_full > num_cached:
                self._update_block_hashes(request, num_full)
                self.block_pool.cache_full_blocks(
                    req_blocks,
                    request.block_hashes,
                    request.token_slice(0, num_full * self.block_size),
                    num_cached,
                    num_full,
                )
                self.num_cached_blocks[request.request_id] = num_full
        return KVCacheBlocks(new_blocks)

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first, so its prefix stays cached longest."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(request.request_id, None)

    def detach(self, request: Request) -> list[KVCacheBlock]:
        """Take a request's blocks out of its table, still referenced (a prefill lease)."""
        self.num_cached_blocks.pop(request.request_id, None)
        return self.req_to_blocks.pop(request.request_id, [])

    def release(self, blocks: list[KVCacheBlock]) -> None:
        """Drop the references ``detach`` kept, tail first as ``free`` does."""
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def take_events(self) -> list[KVCacheEvent]:
        return self.block_pool.take_events()

    def _update_block_hashes(self, request: Request, num_blocks: int) -> None:
        """Extend ``request.block_hashes`` to cover its first ``num_blocks`` full blocks."""
        have = len(request.block_hashes)
        if num_blocks <= have:
            return
        parent = request.block_hashes[-1] if have else None
        tokens = request.token_slice(have * self.block_size, num_blocks * self.block_size)
        request.block_hashes.extend(hash_token_blocks(tokens, self.block_size, parent))
