"""``KVTierManager`` onboarding on the CPU: good blocks land byte for byte, a damaged, foreign
or missing block is refused (never counted as loaded), and the run stops at the first refusal."""

from __future__ import annotations

import queue
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from serving.engine.kv_offload import KVOnboard
from serving.kvcache.disk import DiskTier
from serving.kvcache.header import ModelIdentity, make_header
from serving.kvcache.host import HostTier
from serving.kvcache.manager import KVTierManager, OnboardDone, OnboardLanded
from serving.kvcache.slot_hasher import DigestsInFlight
from serving.kvcache.tier import KVTier

IDENTITY = ModelIdentity("sha256:abc", 30, 3, 64, "float32", 16)
OTHER = ModelIdentity("sha256:def", 30, 3, 64, "float32", 16)
BLOCK_BYTES = 4096
NUM_DEVICE_BLOCKS = 16


def payload(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=g)


def put(store: KVTier, block_hash: int, data: torch.Tensor, identity=IDENTITY) -> None:
    tokens = list(range(16))
    header = make_header(block_hash, None, tokens, memoryview(data.numpy()), identity)
    store.write(block_hash, header.encode(), data)


def onboard(stores: list[KVTier], hashes: list[int], tiers: list[str]) -> tuple:
    pool = torch.zeros(NUM_DEVICE_BLOCKS, BLOCK_BYTES, dtype=torch.uint8)
    inbox: queue.Queue = queue.Queue()
    manager = KVTierManager(stores, block_view=lambda i: pool[i], identity=IDENTITY, post=inbox.put)
    try:
        block_ids = tuple(range(3, 3 + len(hashes)))
        manager.submit_onboard(
            KVOnboard("r1", tuple(hashes), tuple(tiers), block_ids, 0, 16 * len(hashes))
        )
        done = inbox.get(timeout=60)
    finally:
        manager.close()
    assert isinstance(done, OnboardDone)
    return done.result, pool, block_ids


def test_every_good_block_lands_byte_for_byte(tmp_path: Path) -> None:
    host = HostTier(8, BLOCK_BYTES)
    disk = DiskTier(tmp_path, 8)
    datas = [payload(i) for i in range(6)]
    for i, data in enumerate(datas):
        put(host if i % 2 == 0 else disk, 100 + i, data)
    tiers = ["G2" if i % 2 == 0 else "G3" for i in range(6)]
    result, pool, block_ids = onboard([host, disk], [100 + i for i in range(6)], tiers)
    assert result.num_loaded_blocks == 6 and result.rejected == ()
    for data, block_id in zip(datas, block_ids, strict=True):
        assert torch.equal(pool[block_id], data)
    assert dict(result.num_bytes_by_tier) == {"G2": 3 * BLOCK_BYTES, "G3": 3 * BLOCK_BYTES}


@pytest.mark.parametrize("hash_processes", [0, 2], ids=["hashed-here", "helper-processes"])
def test_damaged_foreign_and_missing_blocks_are_refused(hash_processes: int) -> None:
    """Checksums hashed by the read threads, or by the host tier's helper processes (over its
    shared-memory slots, started before the admission loop): the same refusals."""
    host = HostTier(8, BLOCK_BYTES, hash_processes=hash_processes)
    for i in range(5):
        put(host, 200 + i, payload(i), identity=OTHER if i == 3 else IDENTITY)
    slot = host._hash_to_slot[201]
    host.slots[slot][17] ^= 0xFF  # a flipped byte after the header was made
    hashes = [200 + i for i in range(5)] + [999]  # 999 was never stored
    result, pool, block_ids = onboard([host], hashes, ["G2"] * 6)
    assert result.num_loaded_blocks == 1  # the run stops at the damaged second block
    assert dict(result.rejected) == {1: "checksum", 3: "foreign", 5: "missing"}
    assert torch.equal(pool[block_ids[0]], payload(0))


def test_a_failed_checksum_helper_falls_back_to_hashing_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The helpers' answer is lost (a helper died): the blocks are hashed by the read threads,
    and a damaged one is still refused."""
    host = HostTier(4, BLOCK_BYTES, hash_processes=1)
    for i in range(3):
        put(host, 600 + i, payload(30 + i))
    host.slots[host._hash_to_slot[602]][5] ^= 0x01

    def broken(self: DigestsInFlight) -> dict[int, bytes]:
        raise BrokenProcessPool("a helper died")

    monkeypatch.setattr(DigestsInFlight, "result", broken)
    result, pool, block_ids = onboard([host], [600, 601, 602], ["G2"] * 3)
    assert result.num_loaded_blocks == 2
    assert dict(result.rejected) == {2: "checksum"}
    assert torch.equal(pool[block_ids[1]], payload(31))


def test_blocks_in_consecutive_slots_and_blocks_go_as_one_copy(tmp_path: Path) -> None:
    """Host slots 0..5 into device blocks 3..8: one copy, and still every byte right; a disk
    block in between splits the run (its payload is a tensor of its own)."""
    host = HostTier(8, BLOCK_BYTES)
    datas = [payload(10 + i) for i in range(6)]
    for i, data in enumerate(datas):
        put(host, 300 + i, data)
    pool = torch.zeros(NUM_DEVICE_BLOCKS, BLOCK_BYTES, dtype=torch.uint8)
    inbox: queue.Queue = queue.Queue()
    manager = KVTierManager([host], block_view=lambda i: pool[i], identity=IDENTITY, post=inbox.put)
    try:
        manager.submit_onboard(
            KVOnboard("r1", tuple(range(300, 306)), ("G2",) * 6, tuple(range(3, 9)), 0, 96)
        )
        done = inbox.get(timeout=60)
    finally:
        manager.close()
    assert done.result.num_loaded_blocks == 6
    assert manager.num_onboard_copies == 1
    for i, data in enumerate(datas):
        assert torch.equal(pool[3 + i], data)
    # mixed tiers: G2 G2 G3 G2 -> three copies (the disk payload breaks the run)
    disk = DiskTier(tmp_path, 8)
    put(disk, 400, payload(99))
    result, pool2, block_ids = onboard([host, disk], [300, 301, 400, 302], ["G2", "G2", "G3", "G2"])
    assert result.num_loaded_blocks == 4
    for block_id, data in zip(block_ids, [datas[0], datas[1], payload(99), datas[2]], strict=True):
        assert torch.equal(pool2[block_id], data)


def test_messages_come_in_order_checked_then_landed() -> None:
    """CPU pool: the copies end before ``OnboardDone`` (nothing in flight); ``OnboardLanded``
    follows with the bytes moved."""
    host = HostTier(4, BLOCK_BYTES)
    for i in range(3):
        put(host, 500 + i, payload(20 + i))
    pool = torch.zeros(NUM_DEVICE_BLOCKS, BLOCK_BYTES, dtype=torch.uint8)
    inbox: queue.Queue = queue.Queue()
    manager = KVTierManager([host], block_view=lambda i: pool[i], identity=IDENTITY, post=inbox.put)
    try:
        manager.submit_onboard(KVOnboard("r1", (500, 501, 502), ("G2",) * 3, (1, 2, 3), 0, 48))
        done, landed = inbox.get(timeout=60), inbox.get(timeout=60)
    finally:
        manager.close()
    assert isinstance(done, OnboardDone) and done.in_flight is None
    assert isinstance(landed, OnboardLanded) and landed.request_id == "r1"
    assert dict(landed.num_bytes_by_tier) == {"G2": 3 * BLOCK_BYTES}
    assert landed.duration_s >= done.result.duration_s


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_work_after_onboard_done_sees_every_byte() -> None:
    """GPU pool, 512 MiB from pinned host memory: ``OnboardDone`` may come while the copies
    still run; work queued on the engine's stream after ``order_before_compute`` sees the
    landed bytes, never the old ones."""
    num_blocks, block_bytes = 256, 2 << 20
    host = HostTier(num_blocks, block_bytes, pin_memory=True)
    datas = torch.randint(0, 256, (num_blocks, block_bytes), dtype=torch.uint8)
    for i in range(num_blocks):
        put(host, 1000 + i, datas[i])
    pool = torch.zeros(num_blocks + 8, block_bytes, dtype=torch.uint8, device="cuda")
    inbox: queue.Queue = queue.Queue()
    manager = KVTierManager([host], block_view=lambda i: pool[i], identity=IDENTITY, post=inbox.put)
    try:
        ids = tuple(range(num_blocks - 1, -1, -1))  # reversed: one copy per block
        hashes = tuple(1000 + i for i in range(num_blocks))
        manager.submit_onboard(KVOnboard("r1", hashes, ("G2",) * num_blocks, ids, 0, 0))
        done = inbox.get(timeout=120)
        assert isinstance(done, OnboardDone) and done.result.num_loaded_blocks == num_blocks
        assert done.in_flight is not None
        done.in_flight.order_before_compute()
        sums = pool[list(ids)].sum(dim=1, dtype=torch.int64).cpu()  # queued after the wait
        landed = inbox.get(timeout=120)
        assert isinstance(landed, OnboardLanded)
    finally:
        manager.close()
    assert torch.equal(sums, datas.sum(dim=1, dtype=torch.int64))
