"""KV transports: block layout arithmetic, the transport choice, real pulls between processes.

A spawned "prefill" process registers one pool per dtype (float32, bfloat16) of shape
``[2 layers, 2, 64 blocks, 16, 2 heads, 64]`` with seeded random contents and forwards every
notification it receives; this process pulls blocks of it into its own pools, over TCP and NIXL.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from serving.transfer import BlockLayout, TransportError, make_transport, plan_transfer

SHAPE = (2, 2, 64, 16, 2, 64)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REMOTE_SEED, LOCAL_SEED = 1, 2

# (remote block ids, local block ids): one block, 16 consecutive, a scattered set.
BLOCK_SETS = {
    "one": ([5], [17]),
    "sixteen": (list(range(16)), list(range(40, 56))),
    "scattered": ([3, 60, 7, 8, 9, 41, 0, 63], [10, 11, 50, 51, 52, 2, 33, 20]),
}


def make_pool(dtype_name: str, seed: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=generator).to(device=device, dtype=DTYPES[dtype_name])


def layout_of(pool: torch.Tensor) -> BlockLayout:
    return BlockLayout.for_kv_cache(pool.shape, pool.element_size())


# ---- layout (pure) ----


def test_layout_of_the_engine_cache() -> None:
    layout = BlockLayout.for_kv_cache((2, 2, 64, 16, 2, 64), 4)
    assert layout == BlockLayout(
        num_regions=4, num_blocks=64, block_bytes=8192, region_stride_bytes=64 * 8192
    )
    assert layout.pool_bytes == 4 * 64 * 8192
    assert layout.bytes_per_block == 4 * 8192
    assert layout.block_offsets([3]).tolist() == [3 * 8192 + r * 64 * 8192 for r in range(4)]
    assert layout.descriptor_index([3, 0]).tolist() == [3, 0, 67, 64, 131, 128, 195, 192]
    assert layout.all_offsets()[layout.descriptor_index([9])].tolist() == (
        layout.block_offsets([9]).tolist()
    )


def test_layout_offsets_match_torch_indexing() -> None:
    pool = torch.arange(np.prod(SHAPE), dtype=torch.int32).reshape(SHAPE)
    layout = layout_of(pool)
    flat = pool.reshape(-1).view(torch.uint8)
    for region, offset in enumerate(layout.block_offsets([37])):
        expected = pool[region // 2, region % 2, 37].reshape(-1).view(torch.uint8)
        assert torch.equal(flat[offset : offset + layout.block_bytes], expected)


def test_plan_merges_runs_consecutive_on_both_sides() -> None:
    layout = BlockLayout.for_kv_cache((2, 2, 64, 16, 2, 64), 4)
    plan = plan_transfer(layout, list(range(16)), layout, list(range(40, 56)))
    assert len(plan) == 4
    assert plan.lengths.tolist() == [16 * 8192] * 4
    assert plan.local_offsets.tolist() == [40 * 8192 + r * 64 * 8192 for r in range(4)]
    scattered = plan_transfer(layout, [3, 4, 9], layout, [7, 8, 10])
    assert scattered.lengths.tolist() == [2 * 8192, 8192] * 4
    assert scattered.num_bytes == 3 * layout.bytes_per_block


def test_plan_merges_across_regions_when_whole_pools_move() -> None:
    layout = BlockLayout.for_kv_cache((2, 2, 8, 16, 2, 64), 2)
    plan = plan_transfer(layout, list(range(8)), layout, list(range(8)))
    assert plan.lengths.tolist() == [layout.pool_bytes]


def test_plan_rejects_bad_ids_and_layouts() -> None:
    layout = BlockLayout.for_kv_cache(SHAPE, 4)
    with pytest.raises(ValueError, match="outside"):
        plan_transfer(layout, [64], layout, [0])
    with pytest.raises(ValueError, match="remote block ids"):
        plan_transfer(layout, [1, 2], layout, [0])
    other = BlockLayout.for_kv_cache(SHAPE, 2)
    with pytest.raises(ValueError, match="layouts differ"):
        plan_transfer(layout, [1], other, [1])
    assert len(plan_transfer(layout, [], layout, [])) == 0


# ---- the choice ----


def test_auto_falls_back_to_tcp_loudly_without_nixl(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # import fails
    with caplog.at_level(logging.INFO, logger="serving.transfer"):
        transport = make_transport("auto")
    with transport:
        assert transport.kind == "tcp"
        assert transport.choice is not None
        assert transport.choice.is_fallback
        assert "nixl._api" in transport.choice.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("falling back to plain TCP" in r.getMessage() for r in warnings)


def test_explicit_nixl_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    with pytest.raises(TransportError, match="NIXL transport requested"):
        make_transport("nixl")


def test_explicit_tcp_is_labelled() -> None:
    with make_transport("tcp") as transport:
        assert transport.choice is not None
        assert (transport.choice.kind, transport.choice.is_fallback) == ("tcp", False)
        assert transport.metadata()["kind"] == "tcp"
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_transport("rdma")  # type: ignore[arg-type]


def test_register_pool_checks_the_layout() -> None:
    pool = make_pool("float32", 0)
    with make_transport("tcp") as transport:
        with pytest.raises(ValueError, match="contiguous"):
            transport.register_pool(pool.transpose(0, 1), layout_of(pool))
        with pytest.raises(ValueError, match="spans"):
            transport.register_pool(pool, BlockLayout.for_kv_cache(SHAPE, 2))


# ---- two processes ----


def _nixl_unusable_reason() -> str | None:
    try:
        transport = make_transport("nixl")
    except Exception as exc:
        return f"NIXL cannot import or initialise here: {exc}"
    transport.close()
    return None


def _prefill_process(kind: str, device: str, out: mp.Queue, stop: mp.Event) -> None:
    """Registers a pool per dtype, reports their metadata, forwards notifications until ``stop``."""
    transports = {}
    try:
        for dtype_name in DTYPES:
            pool = make_pool(dtype_name, REMOTE_SEED, device)
            transports[dtype_name] = transport = make_transport(kind)
            transport.register_pool(pool, layout_of(pool))
        out.put({name: t.metadata() for name, t in transports.items()})
        while not stop.is_set():
            for dtype_name, transport in transports.items():
                for sender, message in transport.poll_notifications():
                    out.put((dtype_name, sender, message))
            time.sleep(0.005)
    except Exception as exc:
        out.put(exc)
    finally:
        for transport in transports.values():
            transport.close()


class PrefillPeer:
    """The spawned prefill process: its per-dtype metadata and the notifications it forwards."""

    def __init__(self, kind: str, device: str = "cpu") -> None:
        ctx = mp.get_context("spawn")
        self.out: mp.Queue = ctx.Queue()
        self.stop = ctx.Event()
        args = (kind, device, self.out, self.stop)
        self.process = ctx.Process(target=_prefill_process, args=args)
        self.process.start()
        metadata = self.out.get(timeout=60)
        if isinstance(metadata, Exception):
            raise metadata
        self.metadata: dict[str, dict] = metadata

    def wait_notification(self, timeout_s: float = 10.0) -> tuple[str, str, bytes]:
        return self.out.get(timeout=timeout_s)

    def close(self) -> None:
        self.stop.set()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


@pytest.fixture(scope="module", params=["tcp", "nixl"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "nixl" and (reason := _nixl_unusable_reason()):
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def prefill(kind: str) -> Iterator[PrefillPeer]:
    peer = PrefillPeer(kind)
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def decode(kind: str, prefill: PrefillPeer) -> Iterator[dict]:
    """Per dtype: this process's transport, pool and the connected peer's name."""
    sides = {}
    with contextlib.ExitStack() as stack:
        for dtype_name in DTYPES:
            pool = make_pool(dtype_name, LOCAL_SEED)
            transport = stack.enter_context(make_transport(kind))
            transport.register_pool(pool, layout_of(pool))
            peer = transport.connect(prefill.metadata[dtype_name])
            assert transport.connect(prefill.metadata[dtype_name]) == peer  # idempotent
            sides[dtype_name] = (transport, pool, peer)
        yield sides


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("block_set", list(BLOCK_SETS))
def test_pull_round_trips_bytes_exactly(decode: dict, dtype_name: str, block_set: str) -> None:
    transport, pool, peer = decode[dtype_name]
    remote_ids, local_ids = BLOCK_SETS[block_set]
    before = pool.clone()
    transport.pull(peer, remote_ids, local_ids)
    remote = make_pool(dtype_name, REMOTE_SEED)
    assert torch.equal(pool[:, :, local_ids], remote[:, :, remote_ids])
    untouched = [b for b in range(SHAPE[2]) if b not in local_ids]
    assert torch.equal(pool[:, :, untouched], before[:, :, untouched])
    pool.copy_(before)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_notifications_reach_the_prefill_process(
    decode: dict, prefill: PrefillPeer, dtype_name: str
) -> None:
    transport, _, peer = decode[dtype_name]
    transport.notify(peer, b"req-7:done")
    assert prefill.wait_notification() == (dtype_name, transport.name, b"req-7:done")
    with pytest.raises(queue.Empty):
        prefill.wait_notification(timeout_s=0.2)


def test_pull_rejects_ids_outside_either_pool(decode: dict) -> None:
    transport, _, peer = decode["float32"]
    with pytest.raises(ValueError, match="outside"):
        transport.pull(peer, [64], [0])
    with pytest.raises(ValueError, match="outside"):
        transport.pull(peer, [0], [-1])
    with pytest.raises(TransportError, match="not connected"):
        transport.pull("nobody", [0], [0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pull_between_cuda_pools(kind: str) -> None:
    """Both pools on the GPU (NIXL: VRAM registration; TCP: pinned host staging)."""
    peer_process = PrefillPeer(kind, device="cuda")
    try:
        for dtype_name in DTYPES:
            pool = make_pool(dtype_name, LOCAL_SEED, "cuda")
            with make_transport(kind) as transport:
                transport.register_pool(pool, layout_of(pool))
                peer = transport.connect(peer_process.metadata[dtype_name])
                remote_ids, local_ids = BLOCK_SETS["scattered"]
                transport.pull(peer, remote_ids, local_ids)
                remote = make_pool(dtype_name, REMOTE_SEED, "cuda")
                assert torch.equal(pool[:, :, local_ids], remote[:, :, remote_ids])
                transport.notify(peer, b"cuda-done")
                assert peer_process.wait_notification()[2] == b"cuda-done"
    finally:
        peer_process.close()


def test_vectored_io_survives_partial_sends_and_receives() -> None:
    """More bytes than the socket buffers hold: ``sendmsg``/``recvmsg_into`` return part-way."""
    import socket
    import threading

    from serving.transfer.wire import recv_into_views, send_views

    source = np.random.default_rng(0).integers(0, 256, size=3000 * 1024, dtype=np.uint8)
    target = np.zeros_like(source)
    runs = [(i * 1024, 1000 if i % 3 else 1500) for i in range(0, 2990, 2)]  # > IOV_MAX runs
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(
            target=send_views, args=(left, [memoryview(source)[a : a + n] for a, n in runs])
        )
        sender.start()
        recv_into_views(right, [memoryview(target)[a : a + n] for a, n in runs])
        sender.join()
    for start, length in runs:
        assert np.array_equal(target[start : start + length], source[start : start + length])
