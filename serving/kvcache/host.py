"""G2: host memory. One preallocated ``[slots, block_bytes]`` tensor, pinned when the device is
CUDA, so a block moves to and from the device pool as one DMA copy. With ``hash_processes``
the tensor lives in shared memory and helper processes hash an onboard's slots
(``slot_hasher.py``) while the onboard loop queues the copies."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from multiprocessing import shared_memory

import torch

from serving.kvcache.slot_hasher import DigestsInFlight, SlotHasher
from serving.kvcache.tier import KVTier, TierIOError

logger = logging.getLogger(__name__)


def default_hash_processes(on_cuda: bool) -> int:
    """Checksum helpers for a host tier: on a GPU worker one per core up to 16 (16 hashed 2 GiB
    beside the copies in 29 ms on an H200 host, 8 in 42 ms); none on the CPU, where the onboard
    is not the bottleneck and helpers would take the engine's cores."""
    return min(16, os.cpu_count() or 1) if on_cuda else 0


class HostTier(KVTier):
    """Owns the slot tensor, the free-slot list and each slot's header; no eviction policy."""

    name = "G2"
    in_memory = True

    def __init__(
        self,
        capacity_blocks: int,
        block_bytes: int,
        *,
        pin_memory: bool = False,
        hash_processes: int = 0,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.block_bytes = block_bytes
        self.pinned = pin_memory
        self._shm: shared_memory.SharedMemory | None = None
        self._registered_ptr: int | None = None
        self._hasher: SlotHasher | None = None
        if hash_processes > 0:
            self.slots = self._shared_slots(pin_memory)
            self._hasher = SlotHasher(self._shm.name, block_bytes, hash_processes)  # type: ignore[union-attr]
        else:
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

    def _shared_slots(self, pin_memory: bool) -> torch.Tensor:
        """The slot tensor over a new shared-memory segment, page-locked for DMA if asked."""
        num_bytes = self.capacity_blocks * self.block_bytes
        self._shm = shared_memory.SharedMemory(create=True, size=num_bytes)
        slots = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=num_bytes)
        if pin_memory:
            error = torch.cuda.cudart().cudaHostRegister(slots.data_ptr(), num_bytes, 0)
            if int(error) != 0:
                self.close()
                raise TierIOError(f"cannot page-lock {num_bytes} bytes of host KV tier: {error}")
            self._registered_ptr = slots.data_ptr()
        return slots.view(self.capacity_blocks, self.block_bytes)

    def start_checksums(self, block_hashes: Sequence[int]) -> DigestsInFlight | None:
        if self._hasher is None:
            return None
        with self._lock:
            hash_of_slot = {
                slot: h
                for h in block_hashes
                if (slot := self._hash_to_slot.get(h)) is not None and h in self._headers
            }
        return DigestsInFlight(self._hasher.submit(list(hash_of_slot)), hash_of_slot)

    def close(self) -> None:
        hasher, self._hasher = self._hasher, None
        if hasher is not None:
            hasher.close()
        if self._registered_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        shm, self._shm = self._shm, None
        if shm is not None:
            self.slots = torch.empty((0, self.block_bytes), dtype=torch.uint8)
            try:
                shm.close()
            except BufferError:  # a view of a slot is still alive: the mapping goes with it
                logger.debug("host KV tier: a slot view outlives the tier")
            shm.unlink()

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
