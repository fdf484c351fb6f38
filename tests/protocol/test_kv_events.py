"""vLLM KV-event structs against frames from vLLM's own publisher (``tests/vllm_vectors.py``)."""

from __future__ import annotations

from typing import Any

import msgspec

from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from tests.vllm_vectors import load_vector


def load_frames() -> list[dict[str, Any]]:
    """Frames from vLLM's own publisher (tests/vllm_vectors.py)."""
    return load_vector("vllm_kv_events.jsonl")


def stored(
    hashes: list[int],
    parent: int | None,
    first_token: int,
    medium: str = "GPU",
    lora_name: str | None = None,
) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=list(range(first_token, first_token + 16 * len(hashes))),
        block_size=16,
        medium=medium,
        lora_name=lora_name,
    )


# What vectors/README.md says the five captured batches hold.
EXPECTED = [
    KVEventBatch(1795842175.25, [stored([7001, 7002], None, 1000)], 0),
    KVEventBatch(
        1795842175.5,
        [stored([7003], 7002, 1032), stored([9001], None, 5, lora_name="sql-adapter")],
        0,
    ),
    KVEventBatch(
        1795842176.0,
        [stored([7001, 7002], None, 1000, medium="CPU"), BlockRemoved(block_hashes=[7003])],
        0,
    ),
    KVEventBatch(1795842177.0, [stored([776627963145224192], 7002, 1032)], 0),
    KVEventBatch(1795842178.0, [AllBlocksCleared()], 0),
]


def test_vector_frames_decode_to_readme_events() -> None:
    frames = load_frames()
    assert len(frames) == len(EXPECTED)
    for i, frame in enumerate(frames):
        assert bytes.fromhex(frame["topic_hex"]) == b""
        assert int.from_bytes(bytes.fromhex(frame["seq_hex"]), "big") == i
        assert decode_batch(bytes.fromhex(frame["payload_hex"])) == EXPECTED[i]


def test_vector_details() -> None:
    batches = [decode_batch(bytes.fromhex(f["payload_hex"])) for f in load_frames()]
    lora_block = batches[1].events[1]
    assert isinstance(lora_block, BlockStored)
    assert lora_block.lora_name == "sql-adapter" and lora_block.lora_id is None
    offload = batches[2].events[0]
    assert isinstance(offload, BlockStored) and offload.medium == "CPU"
    removed = batches[2].events[1]
    assert isinstance(removed, BlockRemoved)
    assert removed.medium == "GPU" and removed.block_hashes == [7003]
    big = batches[3].events[0]
    assert isinstance(big, BlockStored)
    assert big.block_hashes == [776627963145224192] and big.block_hashes[0] > 2**59
    assert batches[4].events == [AllBlocksCleared()]
    assert all(b.data_parallel_rank == 0 for b in batches)


def test_our_encoding_decodes_to_vllm_decoded_value() -> None:
    for frame in load_frames():
        ours = encode_batch(decode_batch(bytes.fromhex(frame["payload_hex"])))
        # vLLM writes map16 headers where msgspec writes fixmap: compare values, not bytes.
        assert msgspec.msgpack.decode(ours) == frame["decoded"]


def test_expected_structs_encode_to_vllm_decoded_value() -> None:
    for batch, frame in zip(EXPECTED, load_frames(), strict=True):
        assert msgspec.msgpack.decode(encode_batch(batch)) == frame["decoded"]


def test_unknown_keys_are_ignored() -> None:
    """vLLM 0.32 sends more optional keys than the router reads (kv_events.py there)."""
    event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        "kv_cache_spec_sliding_window": None,
        "locality": "LOCAL",
        "ownership": None,
        "session_id": "s-1",
    }
    removed = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 0,
               "locality": "LOCAL"}  # fmt: skip
    batch = decode_batch(msgspec.msgpack.encode([2.0, [event, removed], None]))
    assert batch.events == [
        BlockStored(
            block_hashes=[1],
            parent_block_hash=None,
            token_ids=[1, 2],
            block_size=2,
            extra_keys=[None],
            group_idx=0,
        ),
        BlockRemoved(block_hashes=[1], medium="GPU", group_idx=0),
    ]
    assert batch.data_parallel_rank is None


def test_optional_fields_are_omitted_like_vllm() -> None:
    """vLLM omits extra_keys/group_idx while None and always sends lora_id, medium, lora_name."""
    plain = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1], block_size=1)
    keyed = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1], block_size=1,
                        extra_keys=[["salt"]], group_idx=0)  # fmt: skip
    events = msgspec.msgpack.decode(encode_batch(KVEventBatch(1.0, [plain, keyed], 0)))[1]
    assert set(events[0]) == {"type", "block_hashes", "parent_block_hash", "token_ids",
                              "block_size", "lora_id", "medium", "lora_name"}  # fmt: skip
    assert events[1]["extra_keys"] == [["salt"]] and events[1]["group_idx"] == 0


def test_full_64_bit_and_bytes_hashes_round_trip() -> None:
    batch = KVEventBatch(
        3.0,
        [
            BlockStored(
                block_hashes=[2**64 - 1, b"\x01" * 32],
                parent_block_hash=b"\x02" * 32,
                token_ids=[7, 8],
                block_size=1,
            )
        ],
        1,
    )
    assert decode_batch(encode_batch(batch)) == batch
