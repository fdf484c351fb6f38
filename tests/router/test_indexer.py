"""KVIndexer: router-side chain hashes from KV events, longest cached prefix per worker and tier."""

from __future__ import annotations

import pytest

from serving.protocol.block_hash import hash_token_blocks, salt_for
from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
)
from serving.router.indexer import InvalidKVEvent, KVIndexer, hash_token_ids
from tests.vllm_vectors import load_vector

BS = 4  # block size of the small tests
PROMPT = list(range(100, 116))  # 4 blocks


def stored(
    engine_hashes: list[BlockHash],
    token_ids: list[int],
    parent: BlockHash | None = None,
    medium: str = "GPU",
    lora_name: str | None = None,
) -> BlockStored:
    return BlockStored(
        block_hashes=engine_hashes,
        parent_block_hash=parent,
        token_ids=token_ids,
        block_size=BS,
        medium=medium,
        lora_name=lora_name,
    )


def removed(engine_hashes: list[BlockHash], medium: str = "GPU") -> BlockRemoved:
    return BlockRemoved(block_hashes=engine_hashes, medium=medium)


def store_prefix(
    indexer: KVIndexer, worker_id: str, num_blocks: int, first_hash: int = 1, medium: str = "GPU"
) -> None:
    """Store the first ``num_blocks`` blocks of PROMPT with engine hashes first_hash, +1, ..."""
    engine_hashes: list[BlockHash] = list(range(first_hash, first_hash + num_blocks))
    indexer.apply_event(worker_id, stored(engine_hashes, PROMPT[: num_blocks * BS], medium=medium))


def matches(indexer: KVIndexer, token_ids: list[int] = PROMPT) -> dict[str, dict[str, int]]:
    return indexer.find_matches(indexer.hash_request(token_ids)).worker_to_medium_blocks


@pytest.mark.parametrize("num_tokens", [0, 3, 4, 17, 64])
@pytest.mark.parametrize(("parent", "salt"), [(None, 0), (None, 99), (12345, 0)])
def test_hash_token_ids_equals_shared_block_hash(
    num_tokens: int, parent: int | None, salt: int
) -> None:
    token_ids = [7 * i + 2**31 for i in range(num_tokens)]
    assert hash_token_ids(token_ids, BS, parent, salt) == hash_token_blocks(
        token_ids, BS, parent, salt
    )


def test_router_hashes_ignore_engine_hashes() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 4, first_hash=1)
    store_prefix(indexer, "B", 4, first_hash=900)
    assert matches(indexer) == {"A": {"GPU": 4}, "B": {"GPU": 4}}


def test_chained_events_continue_from_parent() -> None:
    indexer = KVIndexer(BS)
    indexer.apply_events("A", [stored([1, 2], PROMPT[:8]), stored([3], PROMPT[8:12], parent=2)])
    assert matches(indexer) == {"A": {"GPU": 3}}
    assert indexer.num_blocks("A") == 3
    assert len(indexer) == 3


def test_longest_prefix_per_worker() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 3)
    store_prefix(indexer, "B", 1)
    assert matches(indexer) == {"A": {"GPU": 3}, "B": {"GPU": 1}}
    other = [t + 1000 for t in PROMPT]
    assert matches(indexer, other) == {}


def test_match_stops_at_first_gap() -> None:
    """Blocks 0, 1 and 3 held, 2 not: the prefix is 2 blocks even though 3 is cached."""
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 4)
    indexer.apply_event("A", removed([3]))
    assert matches(indexer) == {"A": {"GPU": 2}}


def test_block_removed_in_the_middle_stops_match() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 4)
    store_prefix(indexer, "B", 4, first_hash=50)
    indexer.apply_event("A", removed([2]))
    assert matches(indexer) == {"A": {"GPU": 1}, "B": {"GPU": 4}}
    assert indexer.num_blocks("A") == 3


def test_all_blocks_cleared_drops_only_that_worker() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 4)
    store_prefix(indexer, "B", 2)
    indexer.apply_event("A", AllBlocksCleared())
    assert matches(indexer) == {"B": {"GPU": 2}}
    assert indexer.num_blocks("A") == 0
    assert indexer.worker_ids() == ["A", "B"]


def test_remove_worker_drops_all_its_blocks() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 4)
    store_prefix(indexer, "A", 2, first_hash=20, medium="CPU")
    store_prefix(indexer, "B", 1)
    indexer.remove_worker("A")
    assert matches(indexer) == {"B": {"GPU": 1}}
    assert indexer.worker_ids() == ["B"]
    assert indexer.num_blocks("A") == 0
    # A worker that takes A's slot starts empty.
    indexer.add_worker("C")
    assert matches(indexer) == {"B": {"GPU": 1}}
    indexer.remove_worker("B")
    assert matches(indexer) == {}
    assert len(indexer) == 0


def test_block_counts_in_fastest_tier_and_prefix_spans_tiers() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 2, medium="GPU")
    store_prefix(indexer, "A", 4, medium="CPU")  # offloaded copies of all four
    assert matches(indexer) == {"A": {"GPU": 2, "CPU": 2}}
    indexer.apply_event("A", removed([1], medium="GPU"))
    assert matches(indexer) == {"A": {"CPU": 3, "GPU": 1}}
    assert indexer.num_blocks("A") == 4
    assert indexer.num_blocks("A", "GPU") == 1
    assert indexer.num_blocks("A", "CPU") == 4


def test_removal_from_one_tier_keeps_the_other() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 2, medium="GPU")
    store_prefix(indexer, "A", 2, medium="DISK")
    indexer.apply_event("A", removed([1, 2], medium="DISK"))
    assert matches(indexer) == {"A": {"GPU": 2}}
    indexer.apply_event("A", removed([1, 2], medium="GPU"))
    assert matches(indexer) == {}


def test_shared_tier_counts_for_every_known_worker() -> None:
    """A block in S3 is reusable by every worker of the model, not only the one that wrote it."""
    indexer = KVIndexer(BS)
    indexer.add_worker("B")
    store_prefix(indexer, "A", 2, medium="GPU")
    store_prefix(indexer, "A", 3, first_hash=10, medium="S3")
    assert matches(indexer) == {"A": {"GPU": 2, "S3": 1}, "B": {"S3": 3}}
    private = KVIndexer(BS, shared_media=())
    private.add_worker("B")
    store_prefix(private, "A", 3, medium="S3")
    assert matches(private) == {"A": {"S3": 3}}


def test_lora_blocks_are_salted() -> None:
    indexer = KVIndexer(BS)
    indexer.apply_event("A", stored([1, 2], PROMPT[:8], lora_name="sql"))
    assert matches(indexer) == {}
    salted = hash_token_blocks(PROMPT, BS, salt=salt_for("sql"))
    assert indexer.find_matches(salted).worker_to_medium_blocks == {"A": {"GPU": 2}}
    assert indexer.hash_request(PROMPT, lora_name="sql") == salted


def test_unknown_parent_is_skipped_and_counted() -> None:
    indexer = KVIndexer(BS)
    indexer.apply_event("A", stored([7, 8], PROMPT[4:12], parent=6))
    assert matches(indexer) == {}
    assert indexer.num_orphan_blocks == 2


def test_invalid_events_are_rejected_without_changes() -> None:
    indexer = KVIndexer(BS)
    bad_count = stored([1, 2], PROMPT[:7])
    bad_size = BlockStored(
        block_hashes=[1], parent_block_hash=None, token_ids=list(range(8)), block_size=8
    )
    for event in (bad_count, bad_size):
        with pytest.raises(InvalidKVEvent):
            indexer.apply_event("A", event)
    indexer.apply_events("A", [bad_count, stored([1], PROMPT[:4]), bad_size])
    assert indexer.num_rejected_events == 2
    assert matches(indexer) == {"A": {"GPU": 1}}


def test_replayed_store_is_idempotent() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 2)
    store_prefix(indexer, "A", 2)
    indexer.apply_event("A", removed([2]))
    assert matches(indexer) == {"A": {"GPU": 1}}


def test_same_tokens_under_two_engine_hashes_need_both_removed() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 2, first_hash=1)
    store_prefix(indexer, "A", 2, first_hash=11)
    indexer.apply_event("A", removed([1, 2]))
    assert matches(indexer) == {"A": {"GPU": 2}}
    indexer.apply_event("A", removed([11]))
    assert matches(indexer) == {}


def test_engine_hash_reused_for_other_tokens_replaces_block() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 2)
    other = [t + 1000 for t in PROMPT]
    indexer.apply_event("A", stored([1], other[:4]))
    assert matches(indexer) == {}
    assert matches(indexer, other) == {"A": {"GPU": 1}}
    assert indexer.num_blocks("A") == 2  # the new block 1 and the old block 2


def test_unknown_removal_is_counted() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 1)
    indexer.apply_event("A", removed([1, 99], medium="CPU"))
    assert indexer.num_unknown_removals == 2
    assert matches(indexer) == {"A": {"GPU": 1}}


def test_vllm_vector_stream() -> None:
    frames = load_vector("vllm_kv_events.jsonl")  # from vLLM's own publisher
    batches: list[KVEventBatch] = [
        decode_batch(bytes.fromhex(frame["payload_hex"])) for frame in frames
    ]
    indexer = KVIndexer(16)
    prompt = list(range(1000, 1064))  # the vectors store tokens 1000..1047

    def found() -> dict[str, dict[str, int]]:
        return indexer.find_matches(indexer.hash_request(prompt)).worker_to_medium_blocks

    indexer.apply_batch("w", batches[0])
    assert found() == {"w": {"GPU": 2}}
    indexer.apply_batch("w", batches[1])
    assert found() == {"w": {"GPU": 3}}
    lora_prompt = list(range(5, 21))
    assert indexer.find_matches(indexer.hash_request(lora_prompt, "sql-adapter")).num_blocks("w")
    indexer.apply_batch("w", batches[2])  # 7001/7002 offloaded to CPU, 7003 evicted from GPU
    assert found() == {"w": {"GPU": 2}}
    assert indexer.num_blocks("w", "CPU") == 2
    indexer.apply_batch("w", batches[3])  # 7003's tokens again, under a 64-bit engine hash
    assert found() == {"w": {"GPU": 3}}
    indexer.apply_batch("w", batches[4])
    assert found() == {}
    assert indexer.num_blocks("w") == 0


# vLLM 0.32's optional BlockStored/BlockRemoved fields (vllm/distributed/kv_events.py).


def test_partial_block_is_skipped_and_counted() -> None:
    """vLLM's hybrid-model tail caching stores one block of fewer tokens than the block size."""
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 1)
    partial = BlockStored(block_hashes=[50], parent_block_hash=1, token_ids=PROMPT[4:6],
                          block_size=2)  # fmt: skip
    indexer.apply_events("A", [partial, removed([50])])
    assert indexer.num_partial_blocks == 1
    assert indexer.num_rejected_events == 0
    assert matches(indexer) == {"A": {"GPU": 1}}


def test_other_kv_cache_group_is_skipped() -> None:
    """Hybrid models publish one stream per KV-cache group under the same engine hashes: only
    the followed group's blocks count (group 1 removing a hash leaves group 0's block)."""
    indexer = KVIndexer(BS)
    group0 = stored([1, 2], PROMPT[:8])
    group0.group_idx = 0
    group1 = stored([1, 2], PROMPT[:8])
    group1.group_idx = 1
    drop1 = BlockRemoved(block_hashes=[1, 2], medium="GPU", group_idx=1)
    indexer.apply_events("A", [group0, group1, drop1])
    assert matches(indexer) == {"A": {"GPU": 2}}
    assert indexer.num_other_group_events == 2


def test_cache_salt_in_extra_keys_salts_the_chain() -> None:
    """vLLM puts the request's cache_salt in the first block's extra keys; such blocks match
    only requests with the same salt, and the chain continues from the salted block."""
    indexer = KVIndexer(BS)
    event = stored([1, 2, 3], PROMPT[:12])
    event.extra_keys = [["tenant-a"], None, None]
    indexer.apply_event("A", event)
    assert matches(indexer) == {}
    salted = indexer.hash_request(PROMPT, cache_salt="tenant-a")
    assert indexer.find_matches(salted).worker_to_medium_blocks == {"A": {"GPU": 3}}
    other = indexer.hash_request(PROMPT, cache_salt="tenant-b")
    assert indexer.find_matches(other).worker_to_medium_blocks == {}
    indexer.apply_event("A", stored([4], PROMPT[12:16], parent=3))
    assert indexer.find_matches(salted).worker_to_medium_blocks == {"A": {"GPU": 4}}


def test_lora_name_in_extra_keys_is_the_root_salt_only() -> None:
    """With a LoRA, every block's extra keys start with its name: already in the root salt."""
    indexer = KVIndexer(BS)
    event = stored([1, 2], PROMPT[:8], lora_name="sql")
    event.extra_keys = [["sql"], ["sql"]]
    indexer.apply_event("A", event)
    found = indexer.find_matches(indexer.hash_request(PROMPT, lora_name="sql"))
    assert found.worker_to_medium_blocks == {"A": {"GPU": 2}}


def test_multimodal_keys_never_match_a_text_request() -> None:
    indexer = KVIndexer(BS)
    event = stored([1, 2], PROMPT[:8])
    event.extra_keys = [None, [["image-sha", 0]]]
    indexer.apply_event("A", event)
    assert matches(indexer) == {"A": {"GPU": 1}}
    bad = stored([3], PROMPT[:4])
    bad.extra_keys = [None, ["x"]]  # two entries for one block
    with pytest.raises(InvalidKVEvent):
        indexer.apply_event("A", bad)


def test_held_blocks_are_router_hashes_per_medium() -> None:
    indexer = KVIndexer(BS)
    store_prefix(indexer, "A", 3)
    store_prefix(indexer, "A", 1, first_hash=10, medium="CPU")
    router = hash_token_blocks(PROMPT, BS)
    assert indexer.held_blocks("A") == {
        "GPU": frozenset(router[:3]),
        "CPU": frozenset(router[:1]),
    }
    assert indexer.held_blocks("nobody") == {}


def test_cached_prompt_tokens_follows_vllms_rule() -> None:
    """Whole blocks only, and never the prompt's last token (its logits give the first token)."""
    from serving.router.indexer import cached_prompt_tokens

    assert cached_prompt_tokens(3, 32, 100) == 96
    assert cached_prompt_tokens(3, 32, 96) == 64  # fully cached prompt: the last block recomputed
    assert cached_prompt_tokens(0, 32, 500) == 0
    assert cached_prompt_tokens(5, 32, 1) == 0
