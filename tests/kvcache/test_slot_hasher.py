"""The host tier's checksum helpers: real processes over its shared-memory slots."""

from __future__ import annotations

import pytest
import torch
import xxhash

from serving.kvcache.host import HostTier

BLOCK_BYTES = 8192


def _fill(host: HostTier, count: int) -> dict[int, bytes]:
    expected = {}
    for i in range(count):
        data = torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(i))  # fmt: skip
        host.write(700 + i, b"header", data)
        expected[700 + i] = xxhash.xxh3_128_digest(data.numpy().tobytes())
    return expected


def test_helpers_hash_every_asked_slot_that_is_stored() -> None:
    host = HostTier(16, BLOCK_BYTES, hash_processes=3)
    try:
        expected = _fill(host, 10)
        in_flight = host.start_checksums([*expected, 12345])  # 12345 was never stored
        assert in_flight is not None
        assert in_flight.result() == expected
        host.delete(703)
        assert host.start_checksums([703]).result() == {}  # type: ignore[union-attr]
    finally:
        host.close()


def test_a_dead_helper_fails_its_requests_instead_of_hanging() -> None:
    host = HostTier(8, BLOCK_BYTES, hash_processes=2)
    try:
        expected = _fill(host, 4)
        helper = host._hasher._helpers[0]  # type: ignore[union-attr]
        helper.process.kill()
        helper.process.wait()
        helper._reader.join(timeout=10)  # its answers end with the process
        with pytest.raises(RuntimeError, match="checksum helper"):
            host.start_checksums(list(expected)).result()  # type: ignore[union-attr]
    finally:
        host.close()


def test_a_tier_without_helpers_leaves_hashing_to_the_caller() -> None:
    host = HostTier(4, BLOCK_BYTES)
    assert host.start_checksums([1, 2]) is None
