"""KVPool: block-major bytes, per-layer views and the per-block accessors the tiers use."""

from __future__ import annotations

import pytest
import torch

from serving.engine.kv_pool import KVPool
from serving.transfer.layout import BlockLayout, plan_transfer


def _pool(num_blocks: int = 6) -> KVPool:
    pool = KVPool(
        num_blocks=num_blocks,
        num_layers=3,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device="cpu",
    )
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=torch.Generator().manual_seed(0)))
    return pool


def test_a_block_is_one_contiguous_byte_range() -> None:
    pool = _pool()
    assert pool.block_shape == (3, 2, 4, 2, 8)
    assert pool.block_bytes == 3 * 2 * 4 * 2 * 8 * 4
    flat = pool.tensor.reshape(-1).view(torch.uint8)
    for block_id in range(pool.num_blocks):
        offset, length = pool.block_byte_range(block_id)
        assert (offset, length) == (block_id * pool.block_bytes, pool.block_bytes)
        view = pool.block_bytes_view(block_id)
        assert view.data_ptr() == pool.tensor.data_ptr() + offset
        assert torch.equal(view, flat[offset : offset + length])
        # Every layer's K and V of this block, and nothing else, lies in that range.
        for layer in range(3):
            k = pool.layers[layer][block_id, 0].reshape(-1).view(torch.uint8)
            start = k.data_ptr() - pool.tensor.data_ptr()
            assert offset <= start and start + 2 * k.numel() <= offset + length


def test_block_views_write_through_and_copies_do_not() -> None:
    pool = _pool()
    pool.block(2)[1, 0].fill_(7.0)
    assert torch.equal(pool.layers[1][2, 0], torch.full((4, 2, 8), 7.0))
    data = pool.read_blocks([2, 4])
    data.fill_(0.0)
    assert pool.layers[1][2, 0].eq(7.0).all()
    pool.write_blocks([5, 0], pool.read_blocks([2, 4]))
    assert torch.equal(pool.block(5), pool.block(2)) and torch.equal(pool.block(0), pool.block(4))
    with pytest.raises(ValueError, match="shape"):
        pool.write_blocks([1], data)
    with pytest.raises(ValueError, match="outside"):
        pool.block(6)


def test_layout_moves_each_block_as_one_run() -> None:
    pool = _pool(num_blocks=64)
    layout = pool.layout
    assert layout == BlockLayout.block_major(64, pool.block_bytes)
    assert layout.num_regions == 1 and layout.pool_bytes == pool.tensor.nbytes
    assert layout.block_offsets([9, 3]).tolist() == [9 * pool.block_bytes, 3 * pool.block_bytes]
    plan = plan_transfer(layout, [3, 60, 7, 8, 9], layout, [10, 11, 50, 51, 52])
    bb = pool.block_bytes
    assert plan.lengths.tolist() == [bb, bb, 3 * bb]  # 7, 8, 9 -> 50, 51, 52 merge
    assert plan.remote_offsets.tolist() == [3 * bb, 60 * bb, 7 * bb]
