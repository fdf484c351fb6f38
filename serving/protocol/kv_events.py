"""vLLM's KV-event wire types (``vllm/distributed/kv_events.py``, vLLM 0.32-0.33), in msgspec.

A batch travels as a ZMQ multipart message ``[topic, seq (8-byte big-endian), payload]`` where the
payload is the msgpack array ``[ts, events, data_parallel_rank]`` and each event is a msgpack map
tagged by ``"type"``. Decoding ignores unknown keys, so newer publishers stay readable.

vLLM always sends ``lora_id``, ``medium`` and ``lora_name``, and omits its optional fields while
they are None (``omit_defaults``). The optional fields the router reads are declared here with
the default ``UNSET``, which msgspec never encodes: Strata's publisher sends what vLLM sends.

* ``extra_keys``: one entry per block, the non-token inputs of vLLM's block hash, untagged: the
  LoRA name (when ``lora_name`` is set), ``[mm_identifier, offset]`` pairs, the request's
  ``cache_salt`` (first block only) and prompt-embedding digests, in that order.
* ``group_idx``: the KV-cache group (hybrid models have several; each publishes its own blocks).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

# Block hashes are ints (the low 64 bits of vLLM's sha256) or raw bytes from other engines.
BlockHash = int | bytes
ExtraKeys = list[list[Any] | None]


class BlockStored(msgspec.Struct, tag=True, kw_only=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: ExtraKeys | UnsetType | None = UNSET
    group_idx: int | UnsetType | None = UNSET


class BlockRemoved(msgspec.Struct, tag=True, kw_only=True):
    block_hashes: list[BlockHash]
    medium: str | None = "GPU"
    group_idx: int | UnsetType | None = UNSET


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
