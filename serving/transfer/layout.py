"""Where KV blocks live in a pool's bytes, and which byte runs one transfer moves; pure, no I/O.

A pool is, byte-wise, ``num_regions`` regions of ``num_blocks`` equal runs::

    region 0   | b0 | b1 | ... | b{N-1} |
    region 1   | b0 | b1 | ... | b{N-1} |
    ...
    offset(region r, block b) = r * region_stride_bytes + b * block_bytes

so one block id stands for ``num_regions`` runs of ``block_bytes`` bytes, one in each region.
The engine's cache ``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]`` is
block-major: one region, a block is one run of all its layers' K and V
(``BlockLayout.block_major``). A layer-major cache ``[num_layers, 2, num_blocks, ...]`` has
``num_layers * 2`` regions (``BlockLayout.for_kv_cache``); both sides of a transfer must agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BlockLayout:
    """Maps a block id to its byte runs in a pool; knows nothing about the pool's memory."""

    num_regions: int
    num_blocks: int
    block_bytes: int
    region_stride_bytes: int

    def __post_init__(self) -> None:
        if min(self.num_regions, self.num_blocks, self.block_bytes) < 1:
            raise ValueError(f"layout sizes must be >= 1: {self}")
        if self.region_stride_bytes < self.num_blocks * self.block_bytes:
            raise ValueError(f"regions overlap: stride {self.region_stride_bytes} < blocks: {self}")

    @classmethod
    def block_major(cls, num_blocks: int, block_bytes: int) -> BlockLayout:
        """A pool of ``num_blocks`` contiguous blocks of ``block_bytes`` (the engine's cache)."""
        return cls(
            num_regions=1,
            num_blocks=num_blocks,
            block_bytes=block_bytes,
            region_stride_bytes=num_blocks * block_bytes,
        )

    @classmethod
    def for_kv_cache(cls, shape: Sequence[int], elem_bytes: int) -> BlockLayout:
        """A layer-major cache of ``shape`` (``[layers, 2, num_blocks, ...]``, blocks on axis 2)."""
        if len(shape) < 3:
            raise ValueError(f"KV cache shape needs [layers, 2, num_blocks, ...], got {shape}")
        num_blocks = int(shape[2])
        block_bytes = math.prod(int(d) for d in shape[3:]) * elem_bytes
        return cls(
            num_regions=int(shape[0]) * int(shape[1]),
            num_blocks=num_blocks,
            block_bytes=block_bytes,
            region_stride_bytes=num_blocks * block_bytes,
        )

    @property
    def pool_bytes(self) -> int:
        """Bytes the pool spans: the last region ends here."""
        last_region_bytes = self.num_blocks * self.block_bytes
        return (self.num_regions - 1) * self.region_stride_bytes + last_region_bytes

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for, over all regions."""
        return self.num_regions * self.block_bytes

    def descriptor_index(self, block_ids: Sequence[int]) -> np.ndarray:
        """Index of each (region, block) run in ``all_offsets()``; region-major, then ids."""
        ids = self.check_ids(block_ids)
        regions = np.arange(self.num_regions, dtype=np.int64)[:, None] * self.num_blocks
        return (regions + ids[None, :]).reshape(-1)

    def all_offsets(self) -> np.ndarray:
        """Byte offset of every (region, block) run, indexed by ``descriptor_index``."""
        regions = np.arange(self.num_regions, dtype=np.int64)[:, None] * self.region_stride_bytes
        blocks = np.arange(self.num_blocks, dtype=np.int64)[None, :] * self.block_bytes
        return (regions + blocks).reshape(-1)

    def block_offsets(self, block_ids: Sequence[int]) -> np.ndarray:
        """Byte offset of each run of ``block_ids``, in ``descriptor_index`` order."""
        ids = self.check_ids(block_ids)
        regions = np.arange(self.num_regions, dtype=np.int64)[:, None] * self.region_stride_bytes
        return (regions + ids[None, :] * self.block_bytes).reshape(-1)

    def check_ids(self, block_ids: Sequence[int]) -> np.ndarray:
        """``block_ids`` as int64; raises ``ValueError`` for an id outside ``[0, num_blocks)``."""
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            bad = ids[(ids < 0) | (ids >= self.num_blocks)]
            raise ValueError(f"block ids {bad.tolist()[:8]} outside [0, {self.num_blocks})")
        return ids

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockLayout:
        return cls(**{key: int(data[key]) for key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TransferPlan:
    """Byte runs of one pull: run ``i`` copies ``lengths[i]`` bytes from remote to local offset."""

    remote_offsets: np.ndarray
    local_offsets: np.ndarray
    lengths: np.ndarray

    @property
    def num_bytes(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.lengths)


def plan_transfer(
    remote: BlockLayout,
    remote_block_ids: Sequence[int],
    local: BlockLayout,
    local_block_ids: Sequence[int],
) -> TransferPlan:
    """The byte runs that copy ``remote_block_ids`` onto ``local_block_ids``, adjacent runs merged.

    Runs merge where both sides continue where the previous run ended (consecutive ids on both
    sides, or a region's last block followed by the next region's first): 16 consecutive blocks
    of a 64-region cache become 64 runs of 16 blocks, not 1,024 runs of one.
    """
    if len(remote_block_ids) != len(local_block_ids):
        raise ValueError(
            f"{len(remote_block_ids)} remote block ids but {len(local_block_ids)} local ones"
        )
    if remote.block_bytes != local.block_bytes or remote.num_regions != local.num_regions:
        raise ValueError(f"block layouts differ: remote {remote}, local {local}")
    remote_offsets = remote.block_offsets(remote_block_ids)
    local_offsets = local.block_offsets(local_block_ids)
    return coalesce(remote_offsets, local_offsets, local.block_bytes)


def coalesce(remote_offsets: np.ndarray, local_offsets: np.ndarray, length: int) -> TransferPlan:
    """Merge runs of ``length`` bytes that continue each other on both sides."""
    num_runs = len(remote_offsets)
    if num_runs == 0:
        empty = np.zeros(0, dtype=np.int64)
        return TransferPlan(empty, empty, empty)
    breaks = (np.diff(remote_offsets) != length) | (np.diff(local_offsets) != length)
    starts = np.flatnonzero(np.concatenate(([True], breaks)))
    lengths = np.diff(np.append(starts, num_runs)) * length
    return TransferPlan(remote_offsets[starts], local_offsets[starts], lengths.astype(np.int64))
