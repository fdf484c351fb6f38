"""Block headers and the three stores: bytes round-trip, damage and other models are caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.kvcache.disk import DiskTier
from serving.kvcache.header import (
    BadHeader,
    BlockHeader,
    ChecksumMismatch,
    ForeignBlock,
    ModelIdentity,
    check_header,
    make_header,
    model_digest,
    verify_payload,
)
from serving.kvcache.host import HostTier
from serving.kvcache.s3 import S3Tier, parse_s3_uri
from serving.kvcache.tier import KVTier

IDENTITY = ModelIdentity("sha256:abc", 30, 3, 64, "float32", 16)
OTHER = ModelIdentity("sha256:def", 30, 3, 64, "float32", 16)
BLOCK_BYTES = 4096


def payload(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=g)


def stored(block_hash: int, data: torch.Tensor, identity: ModelIdentity = IDENTITY) -> bytes:
    tokens = list(range(block_hash % 7, block_hash % 7 + 16))
    return make_header(block_hash, 11, tokens, memoryview(data.numpy()), identity).encode()


def test_header_round_trips_and_names_the_block() -> None:
    data = payload(1)
    header = BlockHeader.decode(stored(2**64 - 5, data))
    assert header.block_hash == 2**64 - 5 and header.parent_hash == 11
    assert header.token_ids == tuple(range((2**64 - 5) % 7, (2**64 - 5) % 7 + 16))
    assert header.identity == IDENTITY and header.payload_bytes == BLOCK_BYTES
    check_header(header, 2**64 - 5, IDENTITY)
    verify_payload(header, memoryview(data.numpy()))


def test_flipped_byte_wrong_block_and_other_model_are_refused() -> None:
    data = payload(2)
    header = BlockHeader.decode(stored(7, data))
    bad = data.clone()
    bad[100] ^= 1
    with pytest.raises(ChecksumMismatch):
        verify_payload(header, memoryview(bad.numpy()))
    with pytest.raises(BadHeader):
        check_header(header, 8, IDENTITY)
    with pytest.raises(ForeignBlock, match="another model"):
        check_header(BlockHeader.decode(stored(7, data, OTHER)), 7, IDENTITY)
    with pytest.raises(BadHeader):
        BlockHeader.decode(b"not a block" * 10)


def test_model_digest_prefers_the_staged_manifest(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    plain = model_digest(tmp_path)
    assert plain.startswith("files:")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert model_digest(tmp_path) != plain
    (tmp_path / "strata-manifest.json").write_text('{"digest": "sha256:42"}')
    assert model_digest(tmp_path) == "sha256:42"


def round_trip(store: KVTier) -> None:
    for h in (1, 2**63 + 9):
        data = payload(h % 1000)
        store.write(h, stored(h, data), data)
        header, back = store.read(h)
        assert BlockHeader.decode(header).block_hash == h
        assert torch.equal(back, data)
    assert set(store.list_hashes()) >= {1, 2**63 + 9}
    store.delete(1)
    assert store.read(1) is None
    store.delete(1)  # missing: no error


def test_host_tier_round_trip_and_slot_reuse() -> None:
    store = HostTier(2, BLOCK_BYTES)
    round_trip(store)
    store.write(3, stored(3, payload(3)), payload(3))  # the freed slot is reused
    assert sorted(store.list_hashes()) == [3, 2**63 + 9]


def test_disk_tier_round_trip_and_stale_files_removed(tmp_path: Path) -> None:
    store = DiskTier(tmp_path / "kv", 8)
    round_trip(store)
    assert DiskTier(tmp_path / "kv", 8).list_hashes() == []


def test_s3_tier_round_trip(kv_bucket: str) -> None:
    round_trip(S3Tier(kv_bucket))


def test_s3_uri_errors_name_the_uri(s3_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        parse_s3_uri("bucket/prefix")
    with pytest.raises(ValueError, match="not reachable"):
        S3Tier("s3://no-such-bucket-kv/x")
