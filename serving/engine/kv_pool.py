"""The engine's paged KV cache: one tensor, block-major, so a block is one contiguous byte range.

Layout (``KVPool.tensor``)::

    [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]      (2: K = 0, V = 1)

    block 0: | layer 0 K | layer 0 V | layer 1 K | ... | layer L-1 V |   <- block_bytes
    block 1: | layer 0 K | ...                                        |
    offset(block b) = b * block_bytes

Position ``p`` of a sequence lives in block ``block_ids[p // block_size]`` at offset
``p % block_size`` of every layer's K and V. Attention reads layer ``i`` through the strided
view ``tensor[:, i]`` (``[num_blocks, 2, block_size, kv_heads, head_dim]``); transports, tiers and
disaggregation move whole blocks as one run each (``layout``, ``block_byte_range``,
``block_bytes_view``). Owns the allocation and byte addressing; never decides which blocks a
request gets (the scheduler's block pool does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serving.engine.cpu_memory import zeros_on_huge_pages
from serving.transfer.layout import BlockLayout


class KVPool:
    """One preallocated KV tensor plus the per-layer views and per-block accessors over it."""

    def __init__(
        self,
        *,
        num_blocks: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if min(num_blocks, num_layers, block_size, num_kv_heads, head_dim) < 1:
            raise ValueError("KV pool sizes must be >= 1")
        shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":
            self.tensor = zeros_on_huge_pages(shape, dtype)
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Layer i: [num_blocks, 2, block_size, kv_heads, head_dim], block stride = one block.
        self.layers: list[torch.Tensor] = list(self.tensor.unbind(1))
        # [num_blocks, block_bytes] uint8 over the same memory: a block's bytes in one index
        # (an onboard asks for 1,024 of them in a row).
        self._block_bytes = self.tensor.view(num_blocks, -1).view(torch.uint8)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block: ``[num_layers, 2, block_size, num_kv_heads, head_dim]``."""
        return tuple(self.tensor.shape[1:])

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return self.tensor[0].numel() * self.tensor.element_size()

    @property
    def layout(self) -> BlockLayout:
        """The transports' view: one region of ``num_blocks`` runs of ``block_bytes``."""
        return BlockLayout.block_major(self.num_blocks, self.block_bytes)

    def block(self, block_id: int) -> torch.Tensor:
        """Block ``block_id`` in place (a contiguous view, writes go to the cache)."""
        return self.tensor[self._check(block_id)]

    def block_byte_range(self, block_id: int) -> tuple[int, int]:
        """``(offset, length)`` of the block in the pool's bytes (from ``tensor.data_ptr()``)."""
        return self._check(block_id) * self.block_bytes, self.block_bytes

    def block_bytes_view(self, block_id: int) -> torch.Tensor:
        """The block's bytes in place, as a 1-D ``uint8`` view (for copies to host/disk/S3).
        Consecutive ids are consecutive bytes of one storage (block-major)."""
        return self._block_bytes[self._check(block_id)]

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A contiguous copy ``[len(block_ids), num_layers, 2, block_size, kv_heads, head_dim]``."""
        return self.tensor.index_select(0, self._index(block_ids))

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite whole blocks with ``data`` shaped as ``read_blocks`` returns."""
        expected = (len(block_ids), *self.block_shape)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        source = data.to(device=self.tensor.device, dtype=self.tensor.dtype)
        self.tensor.index_copy_(0, self._index(block_ids), source)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = [self._check(b) for b in block_ids]
        return torch.tensor(ids, dtype=torch.int64, device=self.tensor.device)

    def _check(self, block_id: int) -> int:
        block_id = int(block_id)
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside [0, {self.num_blocks})")
        return block_id
