"""vLLM's KV-event wire types (``vllm/distributed/kv_events.py``, vLLM 0.33), as msgspec structs.

A batch travels as a ZMQ multipart message ``[topic, seq (8-byte big-endian), payload]`` where the
payload is the msgpack array ``[ts, events, data_parallel_rank]`` and each event is a msgpack map
tagged by ``"type"``. Decoding ignores unknown keys, so newer publishers stay readable.
"""

from __future__ import annotations

import msgspec

# Block hashes are ints (the low 64 bits of vLLM's sha256) or raw bytes from other engines.
BlockHash = int | bytes


class BlockStored(msgspec.Struct, tag=True, kw_only=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, kw_only=True):
    block_hashes: list[BlockHash]
    medium: str | None = "GPU"


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[KVCacheEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)
