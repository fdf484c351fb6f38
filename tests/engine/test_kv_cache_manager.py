"""KVCacheManager: block tables, prefix hits, allocation failure, free order, KV events."""

from __future__ import annotations

import random

import pytest

from serving.engine.kv_cache_manager import KVCacheBlocks, KVCacheManager
from serving.engine.request import Request, SamplingParams
from serving.protocol.block_hash import hash_token_blocks
from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from serving.router.block_set import BlockSetTracker

BLOCK_SIZE = 16


def make_request(req_id: str, prompt: list[int], max_tokens: int = 16) -> Request:
    return Request(req_id, list(prompt), SamplingParams(max_tokens=max_tokens))


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def schedule_prompt(kv: KVCacheManager, request: Request) -> KVCacheBlocks:
    """Look up the prefix cache and allocate the rest of the prompt, as the scheduler does."""
    hits, num_hit_tokens = kv.get_computed_blocks(request)
    new = kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hits)
    assert new is not None
    request.num_computed_tokens = request.num_tokens
    return new


def decode_one(kv: KVCacheManager, request: Request, token_id: int) -> KVCacheBlocks | None:
    """Append a sampled token and allocate room to compute it."""
    request.output_token_ids.append(token_id)
    new = kv.allocate_slots(request, 1)
    if new is not None:
        request.num_computed_tokens += 1
    return new


def test_new_request_gets_exact_blocks_and_caches_full_ones() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = make_request("a", tokens(40))
    assert kv.get_computed_blocks(request)[1] == 0
    new = kv.allocate_slots(request, 40)
    assert new is not None
    assert new.get_block_ids() == [0, 1, 2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert request.block_hashes == hash_token_blocks(tokens(32), BLOCK_SIZE)
    assert kv.block_pool.cached_block_hashes() == set(request.block_hashes)
    assert kv.take_events() == [
        BlockStored(
            block_hashes=request.block_hashes,
            parent_block_hash=None,
            token_ids=tokens(32),
            block_size=BLOCK_SIZE,
            medium="GPU",
        )
    ]
    assert kv.usage == pytest.approx(0.3)


def test_chunked_prefill_and_decode_grow_the_table_one_block_at_a_time() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    request = make_request("a", tokens(40))
    assert kv.allocate_slots(request, 20).get_block_ids() == [0, 1]
    request.num_computed_tokens = 20
    assert kv.allocate_slots(request, 20).get_block_ids() == [2]
    request.num_computed_tokens = 40
    kv.take_events()

    outputs = tokens(9, start=900)
    new_ids = [decode_one(kv, request, t).get_block_ids() for t in outputs]
    # Positions 40..47 fit block 2; position 48 (the ninth output's input) opens block 3.
    assert new_ids == [[]] * 8 + [[3]]
    assert kv.get_block_ids("a") == [0, 1, 2, 3]
    full = tokens(40) + outputs[:8]
    assert request.block_hashes == hash_token_blocks(full, BLOCK_SIZE)
    # Block 2 is announced once it is full, with the output tokens it holds.
    assert kv.take_events() == [
        BlockStored(
            block_hashes=[request.block_hashes[2]],
            parent_block_hash=request.block_hashes[1],
            token_ids=full[32:48],
            block_size=BLOCK_SIZE,
        )
    ]


def test_prefix_hit_shares_block_ids() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(50))
    assert schedule_prompt(kv, first).get_block_ids() == [0, 1, 2, 3]

    second = make_request("b", [*tokens(48), 7, 7, 7, 7, 7])
    hits, num_hit_tokens = kv.get_computed_blocks(second)
    assert hits.get_block_ids() == [0, 1, 2]
    assert num_hit_tokens == 48
    new = kv.allocate_slots(second, second.num_tokens - num_hit_tokens, hits)
    assert new.get_block_ids() == [4]
    assert kv.get_block_ids("b") == [0, 1, 2, 4]
    assert [b.ref_cnt for b in hits.blocks] == [2, 2, 2]
    assert second.block_hashes[:3] == first.block_hashes[:3]
    assert kv.block_pool.num_free_blocks == 5


@pytest.mark.parametrize(
    ("prompt_len", "num_hit_blocks"), [(16, 0), (17, 1), (32, 1), (47, 2), (48, 2), (49, 3)]
)
def test_fully_cached_prompt_still_leaves_a_token_to_compute(
    prompt_len: int, num_hit_blocks: int
) -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    schedule_prompt(kv, make_request("a", tokens(64)))
    request = make_request("b", tokens(prompt_len))
    hits, num_hit_tokens = kv.get_computed_blocks(request)
    assert hits.get_block_ids() == list(range(num_hit_blocks))
    assert num_hit_tokens == num_hit_blocks * BLOCK_SIZE
    assert 1 <= prompt_len - num_hit_tokens <= BLOCK_SIZE


def test_recomputed_cached_block_stays_unindexed_and_emits_nothing() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(48))
    schedule_prompt(kv, first)
    kv.take_events()
    second = make_request("b", tokens(48))
    assert schedule_prompt(kv, second).get_block_ids() == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert kv.take_events() == []
    assert kv.block_pool.get_cached_block(first.block_hashes[2]).block_id == 2
    assert kv.block_pool.cached_block_hashes() == set(first.block_hashes)
    # The duplicate's successor still chains from the shared hash.
    for t in tokens(16, start=500):
        decode_one(kv, second, t)
    [stored] = kv.take_events()
    assert stored.parent_block_hash == first.block_hashes[2]
    assert stored.block_hashes == [second.block_hashes[3]]


def test_hits_on_free_blocks_take_them_off_the_free_list() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(40))
    schedule_prompt(kv, first)
    kv.free(first)
    assert kv.block_pool.num_free_blocks == 6
    second = make_request("b", tokens(40))
    schedule_prompt(kv, second)
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [b.ref_cnt for b in kv.req_to_blocks["b"]] == [1, 1, 1]
    assert kv.block_pool.num_free_blocks == 3
    assert kv.usage == 0.5


def test_allocate_slots_returns_none_when_full_and_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(40))
    schedule_prompt(kv, first)
    kv.take_events()

    second = make_request("b", tokens(20, start=100))
    assert kv.allocate_slots(second, 20) is None
    assert kv.block_pool.num_free_blocks == 1
    assert kv.get_block_ids("b") == []
    assert "b" not in kv.req_to_blocks
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.take_events() == []
    assert kv.allocate_slots(second, 16).get_block_ids() == [3]

    # A running request that cannot grow keeps what it has.
    first.output_token_ids.extend(tokens(8, start=900))
    assert kv.allocate_slots(first, 9) is None
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.block_pool.num_free_blocks == 0


def test_allocate_slots_counts_free_hits_as_taken() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(50))
    schedule_prompt(kv, first)
    kv.free(first)  # 4 free blocks, three of them cached hits for the next request
    kv.take_events()

    too_long = make_request("b", tokens(78))
    hits, num_hit_tokens = kv.get_computed_blocks(too_long)
    assert hits.get_block_ids() == [0, 1, 2]
    # 5 blocks needed, 3 are hits; 2 new would have to come out of 1 non-hit free block.
    assert kv.allocate_slots(too_long, 78 - num_hit_tokens, hits) is None
    assert [b.ref_cnt for b in hits.blocks] == [0, 0, 0]
    assert kv.block_pool.num_free_blocks == 4
    assert kv.block_pool.cached_block_hashes() == set(first.block_hashes)
    assert kv.take_events() == []
    assert "b" not in kv.req_to_blocks

    fits = make_request("c", tokens(58))
    new = schedule_prompt(kv, fits)
    assert new.get_block_ids() == [3]
    assert kv.get_block_ids("c") == [0, 1, 2, 3]
    assert kv.block_pool.num_free_blocks == 0


def test_free_is_tail_first_so_the_tail_is_evicted_first() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(70))  # blocks 0..4, the first four full
    schedule_prompt(kv, first)
    kv.free(first)  # free list: 5 6 7 4 3 2 1 0
    kv.take_events()

    other = make_request("b", tokens(60, start=1000))
    assert schedule_prompt(kv, other).get_block_ids() == [5, 6, 7, 4]
    # Block 4 held no full block: reusing it evicts nothing.
    assert [type(e) for e in kv.take_events()] == [BlockStored]
    another = make_request("c", tokens(20, start=2000))
    assert schedule_prompt(kv, another).get_block_ids() == [3, 2]
    assert kv.take_events()[0] == BlockRemoved(
        block_hashes=[first.block_hashes[3], first.block_hashes[2]], medium="GPU"
    )
    again = make_request("d", tokens(70))
    hits, num_hit_tokens = kv.get_computed_blocks(again)
    assert hits.get_block_ids() == [0, 1]
    assert num_hit_tokens == 32


def test_a_hole_in_the_cached_chain_ends_the_hit() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_request("a", tokens(50))
    schedule_prompt(kv, first)
    kv.free(first)  # free list: 3 2 1 0
    middle = [kv.block_pool.blocks[1], kv.block_pool.blocks[2]]
    kv.block_pool.touch(middle)
    assert [b.block_id for b in kv.block_pool.get_new_blocks(2)] == [3, 0]
    kv.block_pool.free_blocks(middle)
    assert kv.block_pool.cached_block_hashes() == set(first.block_hashes[1:3])
    hits, num_hit_tokens = kv.get_computed_blocks(make_request("b", tokens(50)))
    assert (hits.get_block_ids(), num_hit_tokens) == ([], 0)


def test_recomputing_an_evicted_request_caches_its_blocks_again() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", tokens(40))
    schedule_prompt(kv, request)
    kv.free(request)  # as a preemption does
    schedule_prompt(kv, make_request("b", tokens(64, start=500)))  # evicts all of a's blocks
    kv.free(make_request("b", []))
    assert kv.block_pool.cached_block_hashes().isdisjoint(request.block_hashes)
    kv.take_events()

    request.num_computed_tokens = 0
    schedule_prompt(kv, request)
    assert kv.block_pool.cached_block_hashes() >= set(request.block_hashes)
    assert [e for e in kv.take_events() if isinstance(e, BlockStored)] == [
        BlockStored(
            block_hashes=request.block_hashes,
            parent_block_hash=None,
            token_ids=tokens(32),
            block_size=BLOCK_SIZE,
        )
    ]


def test_block_hashes_are_chained() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    shared_tail = tokens(16, start=300)
    first = make_request("a", tokens(16) + shared_tail + [1])
    second = make_request("b", tokens(16, start=100) + shared_tail + [1])
    schedule_prompt(kv, first)
    schedule_prompt(kv, second)
    assert first.block_hashes == hash_token_blocks(first.prompt_token_ids, BLOCK_SIZE)
    assert second.block_hashes == hash_token_blocks(second.prompt_token_ids, BLOCK_SIZE)
    # Same tokens in block 1, different parents: different hashes, no hit.
    assert first.block_hashes[1] != second.block_hashes[1]
    assert kv.get_block_ids("b") == [3, 4, 5]


def test_prefix_cache_stats_accumulate_until_taken() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    kv.record_prefix_lookup(40, 0)
    kv.record_prefix_lookup(50, 32)
    stats = kv.take_prefix_cache_stats()
    assert (stats.queries, stats.hits) == (90, 32)
    stats = kv.take_prefix_cache_stats()
    assert (stats.queries, stats.hits) == (0, 0)


def test_caching_disabled_never_hits_or_emits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=False)
    first = make_request("a", tokens(40))
    schedule_prompt(kv, first)
    second = make_request("b", tokens(40))
    hits, num_hit_tokens = kv.get_computed_blocks(second)
    assert (hits.get_block_ids(), num_hit_tokens) == ([], 0)
    schedule_prompt(kv, second)
    assert kv.get_block_ids("b") == [3, 4, 5]
    assert kv.take_events() == []
    assert kv.block_pool.cached_block_hashes() == set()


def test_allocate_slots_rejects_empty_allocation() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="num_new_tokens must be > 0"):
        kv.allocate_slots(make_request("a", tokens(4)), 0)


def test_reset_prefix_cache_needs_every_block_free() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", tokens(40))
    schedule_prompt(kv, request)
    kv.take_events()
    assert kv.reset_prefix_cache() is False
    kv.free(request)
    assert kv.reset_prefix_cache() is True
    assert kv.take_events() == [AllBlocksCleared()]
    assert kv.get_computed_blocks(make_request("b", tokens(40)))[1] == 0


# -- KV events rebuild the pool's cached set ---------------------------------------------------


def _check_event_content(events: list) -> None:
    """Every BlockStored names the chained hashes of the tokens it carries."""
    for event in events:
        if isinstance(event, BlockStored):
            assert event.block_hashes == hash_token_blocks(
                event.token_ids, event.block_size, event.parent_block_hash
            )


def test_kv_events_rebuild_cached_set_under_random_workload() -> None:
    rng = random.Random(1234)
    kv = KVCacheManager(num_blocks=24, block_size=BLOCK_SIZE)
    prefixes = [tokens(rng.randrange(16, 80), start=10_000 * (i + 1)) for i in range(4)]
    tracker = BlockSetTracker()
    rebuilt: set[int] = set()
    all_events: list = []
    live: dict[str, Request] = {}
    num_evictions = num_resets = 0

    def apply(events: list) -> None:
        nonlocal num_evictions, num_resets
        _check_event_content(events)
        all_events.extend(events)
        tracker.apply(events)
        for event in events:
            if isinstance(event, BlockStored):
                assert rebuilt.isdisjoint(event.block_hashes)
                rebuilt.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= rebuilt
                rebuilt.difference_update(event.block_hashes)
                num_evictions += len(event.block_hashes)
            else:
                rebuilt.clear()
                num_resets += 1

    for step in range(600):
        op = rng.random()
        if op < 0.3 and len(live) < 6:
            prompt = rng.choice(prefixes) + [
                rng.randrange(50_000) for _ in range(rng.randrange(40))
            ]
            request = make_request(f"r{step}", prompt)
            hits, num_hit_tokens = kv.get_computed_blocks(request)
            if kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hits) is not None:
                request.num_computed_tokens = request.num_tokens
                live[request.request_id] = request
        elif op < 0.8 and live:
            request = live[rng.choice(sorted(live))]
            if decode_one(kv, request, rng.randrange(50_000)) is None:
                request.output_token_ids.pop()
        elif live:
            kv.free(live.pop(rng.choice(sorted(live))))
        elif rng.random() < 0.3:
            assert kv.reset_prefix_cache()
        apply(kv.take_events())
        assert rebuilt == kv.block_pool.cached_block_hashes()
        assert tracker.held_hashes("GPU") == kv.block_pool.cached_block_hashes()

    for request in live.values():
        kv.free(request)
    assert kv.block_pool.num_free_blocks == kv.num_blocks
    apply(kv.take_events())
    assert rebuilt == kv.block_pool.cached_block_hashes()
    assert num_evictions > 50
    assert num_resets > 0
    # Every held block's prefix is recoverable from the events and hashes back to its name.
    for block_hash, prefix in tracker.held_prefixes().items():
        if prefix is not None:
            assert hash_token_blocks(prefix, BLOCK_SIZE)[-1] == block_hash

    # The same events survive the wire format.
    batch = KVEventBatch(ts=1.5, events=all_events, data_parallel_rank=None)
    assert decode_batch(encode_batch(batch)) == batch
