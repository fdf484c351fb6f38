"""G2: host memory. One preallocated ``[slots, block_bytes]`` tensor, pinned when the device is
CUDA, so a block moves to and from the device pool as one DMA copy."""

from __future__ import annotations

import threading

import torch

from serving.kvcache.tier import KVTier, TierIOError


class HostTier(KVTier):
    """Owns the slot tensor, the free-slot list and each slot's header; no eviction policy."""

    name = "G2"
    in_memory = True

    def __init__(self, capacity_blocks: int, block_bytes: int, *, pin_memory: bool = False) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.block_bytes = block_bytes
        self.pinned = pin_memory
        self.slots = torch.empty(
            (capacity_blocks, block_bytes), dtype=torch.uint8, pin_memory=pin_memory
        )
        self._lock = threading.Lock()
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self._hash_to_slot: dict[int, int] = {}
        self._headers: dict[int, bytes] = {}

    def write(self, block_hash: int, header: bytes, payload: torch.Tensor) -> None:
        if payload.numel() * payload.element_size() != self.block_bytes:
            raise TierIOError(f"payload of {payload.nbytes} bytes, slots hold {self.block_bytes}")
        with self._lock:
            slot = self._hash_to_slot.get(block_hash)
            if slot is None:
                if not self._free:
                    raise TierIOError("host KV tier is full (the stack reserves before writing)")
                slot = self._free.pop()
                self._hash_to_slot[block_hash] = slot
            self._headers.pop(block_hash, None)  # unreadable until the bytes are in
        self.slots[slot].copy_(payload.reshape(-1).view(torch.uint8))
        with self._lock:
            self._headers[block_hash] = header

    def read(self, block_hash: int) -> tuple[bytes, torch.Tensor] | None:
        """The header and the slot itself (a view: the stack pins the block while it is read)."""
        with self._lock:
            slot = self._hash_to_slot.get(block_hash)
            header = self._headers.get(block_hash)
        if slot is None or header is None:
            return None
        return header, self.slots[slot]

    def delete(self, block_hash: int) -> None:
        with self._lock:
            slot = self._hash_to_slot.pop(block_hash, None)
            self._headers.pop(block_hash, None)
            if slot is not None:
                self._free.append(slot)

    def list_hashes(self) -> list[int]:
        with self._lock:
            return list(self._headers)
