"""BlockPool: LRU free list, ref counts, the hash index, KV events and usage."""

from __future__ import annotations

import pytest

from serving.engine.block_pool import BlockPool, KVCacheBlock
from serving.protocol.block_hash import hash_token_blocks
from serving.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BLOCK_SIZE = 4


def _tokens(num_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + num_blocks * BLOCK_SIZE))


def _ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def _cached_pool(num_blocks: int, num_cached: int) -> tuple[BlockPool, list[KVCacheBlock], list]:
    """A pool whose first ``num_cached`` blocks hold one cached chain, still referenced."""
    pool = BlockPool(num_blocks, BLOCK_SIZE)
    blocks = pool.get_new_blocks(num_cached)
    tokens = _tokens(num_cached)
    hashes = hash_token_blocks(tokens, BLOCK_SIZE)
    pool.cache_full_blocks(blocks, hashes, tokens, 0, num_cached)
    pool.take_events()
    return pool, blocks, hashes


def _drain_order(pool: BlockPool) -> list[int]:
    """Block ids in the order the pool hands them out (takes every free block)."""
    return _ids(pool.get_new_blocks(pool.num_free_blocks))


def test_fresh_pool_hands_out_blocks_in_id_order() -> None:
    pool = BlockPool(5, BLOCK_SIZE)
    assert pool.num_free_blocks == 5
    assert pool.usage == 0.0
    blocks = pool.get_new_blocks(3)
    assert _ids(blocks) == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert [b.block_hash for b in blocks] == [None, None, None]
    assert pool.num_free_blocks == 2
    assert _ids(pool.get_new_blocks(2)) == [3, 4]
    assert pool.num_free_blocks == 0
    assert pool.take_events() == []


def test_get_new_blocks_beyond_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3, BLOCK_SIZE)
    pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="cannot get 2 free blocks, only 1 free"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1
    assert _ids(pool.get_new_blocks(1)) == [2]


def test_num_blocks_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0, BLOCK_SIZE)


def test_freed_blocks_join_the_tail_in_free_order() -> None:
    pool = BlockPool(6, BLOCK_SIZE)
    blocks = pool.get_new_blocks(4)  # free list: [4, 5]
    pool.free_blocks([blocks[2], blocks[0], blocks[3], blocks[1]])
    assert [b.ref_cnt for b in blocks] == [0, 0, 0, 0]
    assert _drain_order(pool) == [4, 5, 2, 0, 3, 1]


def test_touching_a_free_cached_block_removes_it_and_freeing_returns_it_to_the_tail() -> None:
    pool, blocks, hashes = _cached_pool(6, 4)
    pool.free_blocks(blocks)  # free list: [4, 5, 0, 1, 2, 3]
    assert pool.num_free_blocks == 6

    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 1
    assert pool.num_free_blocks == 5
    assert pool.get_cached_block(hashes[1]) is blocks[1]  # still cached while in use
    pool.free_blocks([blocks[1]])  # back at the tail: [4, 5, 0, 2, 3, 1]
    assert blocks[1].ref_cnt == 0

    assert _drain_order(pool) == [4, 5, 0, 2, 3, 1]


def test_eviction_follows_lru_order_and_records_block_removed() -> None:
    pool, blocks, hashes = _cached_pool(4, 4)
    pool.free_blocks([blocks[3], blocks[1], blocks[0], blocks[2]])

    first = pool.get_new_blocks(2)
    assert _ids(first) == [3, 1]
    assert [b.block_hash for b in first] == [None, None]
    assert [b.ref_cnt for b in first] == [1, 1]
    assert pool.get_cached_block(hashes[3]) is None
    assert pool.get_cached_block(hashes[1]) is None
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    assert pool.cached_block_hashes() == {hashes[0], hashes[2]}
    assert pool.take_events() == [BlockRemoved(block_hashes=[hashes[3], hashes[1]], medium="GPU")]

    assert _ids(pool.get_new_blocks(1)) == [0]
    assert pool.take_events() == [BlockRemoved(block_hashes=[hashes[0]], medium="GPU")]
    assert pool.cached_block_hashes() == {hashes[2]}


def test_reusing_uncached_blocks_records_no_event() -> None:
    pool, blocks, hashes = _cached_pool(4, 1)  # block 0 cached; 1..3 never cached
    plain = pool.get_new_blocks(2)
    pool.free_blocks(plain)
    pool.free_blocks(blocks)  # free list: [3, 1, 2, 0]
    assert _ids(pool.get_new_blocks(3)) == [3, 1, 2]
    assert pool.take_events() == []
    assert pool.get_new_blocks(1)[0] is blocks[0]
    assert pool.take_events() == [BlockRemoved(block_hashes=[hashes[0]], medium="GPU")]


def test_ref_counts_track_every_holder() -> None:
    pool, blocks, hashes = _cached_pool(3, 2)
    pool.touch(blocks)  # a second request shares both blocks
    pool.touch(blocks[:1])  # and a third the first
    assert [b.ref_cnt for b in blocks] == [3, 2]
    assert pool.num_free_blocks == 1

    pool.free_blocks(reversed(blocks))
    assert [b.ref_cnt for b in blocks] == [2, 1]
    assert pool.num_free_blocks == 1
    pool.free_blocks(reversed(blocks))
    assert [b.ref_cnt for b in blocks] == [1, 0]
    assert pool.num_free_blocks == 2
    pool.free_blocks(blocks[:1])
    assert [b.ref_cnt for b in blocks] == [0, 0]
    assert pool.num_free_blocks == 3
    # Freed blocks stay findable by hash until they are reused.
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    assert pool.get_cached_block(hashes[1]) is blocks[1]
    assert _drain_order(pool) == [2, 1, 0]


def test_cache_full_blocks_indexes_and_records_block_stored() -> None:
    pool = BlockPool(8, BLOCK_SIZE)
    blocks = pool.get_new_blocks(3)
    tokens = _tokens(3, start=100)
    hashes = hash_token_blocks(tokens, BLOCK_SIZE)

    pool.cache_full_blocks(blocks, hashes, tokens, 0, 2)
    assert [b.block_hash for b in blocks] == [hashes[0], hashes[1], None]
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    assert pool.get_cached_block(hashes[1]) is blocks[1]
    assert pool.cached_block_hashes() == {hashes[0], hashes[1]}
    [stored] = pool.take_events()
    assert stored == BlockStored(
        block_hashes=[hashes[0], hashes[1]],
        parent_block_hash=None,
        token_ids=list(range(100, 108)),
        block_size=BLOCK_SIZE,
        medium="GPU",
    )
    assert stored.lora_id is None
    assert stored.lora_name is None

    # The next block continues the chain from its parent.
    pool.cache_full_blocks(blocks, hashes, tokens, 2, 3)
    assert pool.take_events() == [
        BlockStored(
            block_hashes=[hashes[2]],
            parent_block_hash=hashes[1],
            token_ids=list(range(108, 112)),
            block_size=BLOCK_SIZE,
            medium="GPU",
        )
    ]
    # Nothing new to cache: no event.
    pool.cache_full_blocks(blocks, hashes, tokens, 3, 3)
    assert pool.take_events() == []


def test_first_copy_wins_and_stored_events_split_around_duplicates() -> None:
    pool = BlockPool(8, BLOCK_SIZE)
    tokens = _tokens(3)
    hashes = hash_token_blocks(tokens, BLOCK_SIZE)
    first = pool.get_new_blocks(3)
    pool.cache_full_blocks(first[1:2], hashes[1:2], tokens[4:8], 0, 1)  # only the middle block
    pool.take_events()

    second = pool.get_new_blocks(3)
    pool.cache_full_blocks(second, hashes, tokens, 0, 3)
    assert [b.block_hash for b in second] == [hashes[0], None, hashes[2]]
    assert pool.get_cached_block(hashes[1]) is first[1]
    assert pool.take_events() == [
        BlockStored(
            block_hashes=[hashes[0]],
            parent_block_hash=None,
            token_ids=tokens[0:4],
            block_size=BLOCK_SIZE,
        ),
        BlockStored(
            block_hashes=[hashes[2]],
            parent_block_hash=hashes[1],
            token_ids=tokens[8:12],
            block_size=BLOCK_SIZE,
        ),
    ]
    # Evicting the unindexed duplicate removes nothing from the index.
    pool.free_blocks([second[1]])
    pool.get_new_blocks(pool.num_free_blocks)
    assert pool.take_events() == []
    assert pool.cached_block_hashes() == set(hashes)


def test_reset_prefix_cache_refused_while_a_block_is_held() -> None:
    pool, blocks, hashes = _cached_pool(4, 2)
    pool.free_blocks(blocks[1:])
    assert pool.reset_prefix_cache() is False
    assert pool.take_events() == []
    assert pool.cached_block_hashes() == set(hashes)


def test_reset_prefix_cache_clears_index_and_records_all_blocks_cleared() -> None:
    pool, blocks, hashes = _cached_pool(4, 2)
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.cached_block_hashes() == set()
    assert pool.get_cached_block(hashes[0]) is None
    assert [b.block_hash for b in blocks] == [None, None]
    # Reusing the blocks evicts nothing: they were already forgotten.
    pool.get_new_blocks(4)
    assert pool.take_events() == []


def test_usage_counts_held_blocks_only() -> None:
    pool, blocks, _ = _cached_pool(4, 2)
    assert pool.usage == 0.5
    extra = pool.get_new_blocks(1)
    assert pool.usage == 0.75
    pool.free_blocks(blocks)  # cached but free: counts as free
    assert pool.usage == 0.25
    pool.touch(blocks[:1])
    assert pool.usage == 0.5
    pool.free_blocks(blocks[:1] + extra)
    assert pool.usage == 0.0


def test_take_events_drains() -> None:
    pool, blocks, _ = _cached_pool(2, 2)
    pool.free_blocks(blocks)
    pool.get_new_blocks(2)
    assert len(pool.take_events()) == 1
    assert pool.take_events() == []


def test_caching_disabled_indexes_nothing() -> None:
    pool = BlockPool(4, BLOCK_SIZE, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    tokens = _tokens(2)
    hashes = hash_token_blocks(tokens, BLOCK_SIZE)
    pool.cache_full_blocks(blocks, hashes, tokens, 0, 2)
    assert [b.block_hash for b in blocks] == [None, None]
    assert pool.cached_block_hashes() == set()
    assert pool.get_cached_block(hashes[0]) is None
    assert pool.take_events() == []
