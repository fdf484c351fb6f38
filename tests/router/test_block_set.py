"""BlockSetTracker rebuilds which token blocks a worker holds, per medium."""

from __future__ import annotations

import pytest

from serving.protocol.block_hash import hash_token_blocks
from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
)
from serving.router.block_set import BlockSetTracker, HeldBlock
from tests.vllm_vectors import load_vector

BIG_HASH = 776627963145224192


def vector_batches() -> list[KVEventBatch]:
    frames = load_vector("vllm_kv_events.jsonl")  # from vLLM's own publisher
    return [decode_batch(bytes.fromhex(frame["payload_hex"])) for frame in frames]


def tokens(first: int, last_inclusive: int) -> list[int]:
    return list(range(first, last_inclusive + 1))


def test_vector_stream_rebuilds_held_blocks() -> None:
    batches = vector_batches()
    tracker = BlockSetTracker()

    tracker.apply(batches[0].events)
    assert tracker.held_prefixes("GPU") == {7001: tokens(1000, 1015), 7002: tokens(1000, 1031)}
    assert tracker.block(7002) == HeldBlock(7001, tuple(tokens(1016, 1031)), None)

    tracker.apply(batches[1].events)
    assert tracker.held_hashes("GPU") == {7001, 7002, 7003, 9001}
    assert tracker.prefix_token_ids(7003) == tokens(1000, 1047)
    assert tracker.prefix_token_ids(9001) == tokens(5, 20)
    assert tracker.block(9001).lora_name == "sql-adapter"

    tracker.apply(batches[2].events)  # 7001/7002 offloaded to CPU, 7003 evicted from GPU
    assert tracker.media() == {"GPU", "CPU"}
    assert tracker.held_hashes("GPU") == {7001, 7002, 9001}
    assert tracker.held_prefixes("CPU") == {7001: tokens(1000, 1015), 7002: tokens(1000, 1031)}
    assert tracker.prefix_token_ids(7003) is None

    tracker.apply(batches[3].events)
    assert tracker.held_hashes("GPU") == {7001, 7002, 9001, BIG_HASH}
    assert tracker.prefix_token_ids(BIG_HASH) == tokens(1000, 1047)

    tracker.apply(batches[4].events)
    assert tracker.media() == set()
    assert tracker.held_hashes("GPU") == frozenset() and tracker.held_prefixes("CPU") == {}


def test_router_hash_ignores_engine_hash() -> None:
    """Blocks 7003 and BIG_HASH hold the same tokens under different engine hashes: the
    router's own chained hashes of the rebuilt prefixes agree."""
    batches = vector_batches()
    tracker = BlockSetTracker()
    tracker.apply(batches[0].events + batches[1].events)
    before = tracker.prefix_token_ids(7003)
    tracker.apply(batches[3].events)
    after = tracker.prefix_token_ids(BIG_HASH)
    assert before is not None and after is not None
    assert hash_token_blocks(before, 16) == hash_token_blocks(after, 16)


def test_removal_from_one_medium_keeps_block_held_elsewhere() -> None:
    tracker = BlockSetTracker()
    store = BlockStored(
        block_hashes=[1, 2], parent_block_hash=None, token_ids=[10, 11, 12, 13], block_size=2
    )
    tracker.apply(
        [
            store,
            BlockStored(
                block_hashes=[2],
                parent_block_hash=1,
                token_ids=[12, 13],
                block_size=2,
                medium="CPU",
            ),
        ]
    )
    tracker.apply([BlockRemoved(block_hashes=[2], medium="GPU")])
    assert tracker.held_hashes() == {1}
    assert tracker.held_prefixes("CPU") == {2: [10, 11, 12, 13]}
    tracker.apply([BlockRemoved(block_hashes=[1, 2, 3], medium="GPU")])  # unknown 3: no-op
    assert tracker.held_prefixes("CPU") == {2: None}  # parent 1 is no longer held anywhere
    tracker.apply([BlockRemoved(block_hashes=[2], medium="CPU")])
    with pytest.raises(KeyError):
        tracker.block(2)
    tracker.apply([AllBlocksCleared()])
    assert tracker.media() == set()


def test_medium_none_means_gpu_and_bad_token_count_raises() -> None:
    tracker = BlockSetTracker()
    tracker.apply_event(
        BlockStored(
            block_hashes=[b"\x01" * 32],
            parent_block_hash=None,
            token_ids=[1],
            block_size=1,
            medium=None,
        )
    )
    assert tracker.held_hashes("GPU") == {b"\x01" * 32}
    with pytest.raises(ValueError, match="3 token ids for 2 blocks of 2"):
        tracker.apply_event(
            BlockStored(
                block_hashes=[5, 6], parent_block_hash=None, token_ids=[1, 2, 3], block_size=2
            )
        )
