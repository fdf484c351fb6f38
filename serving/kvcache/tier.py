"""``KVTier``: the one small interface every KV tier below the device implements.

G1 is the engine's own pool (``serving/engine/kv_pool.py`` + the block pool's hash index). Below it:

| tier | medium (KV events) | store | module |
| --- | --- | --- | --- |
| G2 | ``CPU`` | host memory, one preallocated (pinned on CUDA) tensor of slots | ``host.py`` |
| G3 | ``DISK`` | a local directory, one file per block | ``disk.py`` |
| G4 | ``S3`` | a bucket/prefix shared by every worker of one model version | ``s3.py`` |

A store keeps bytes by block hash and nothing else: which blocks it holds, their LRU order,
capacity and KV events are the pure ``TierStack``'s (``stack.py``); moving bytes on threads is
the ``KVTierManager``'s (``manager.py``). Every stored block is ``header || payload``
(``header.py``); stores keep the two apart only where that saves a copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.kvcache.slot_hasher import DigestsInFlight

# Tier name -> the ``medium`` its KV events carry (vLLM's field; "GPU" is G1's).
TIER_MEDIA: dict[str, str] = {"G1": "GPU", "G2": "CPU", "G3": "DISK", "G4": "S3"}
MEDIUM_TIERS: dict[str, str] = {medium: tier for tier, medium in TIER_MEDIA.items()}
LOWER_TIERS: tuple[str, ...] = ("G2", "G3", "G4")


class TierIOError(RuntimeError):
    """A store could not read or write a block (the caller recomputes; nothing is served)."""


class KVTier(ABC):
    """Bytes of KV blocks by block hash. Thread-safe: one writer thread, many readers.

    ``write`` replaces any block stored under the same hash; ``read`` returns ``None`` when the
    block is not there (never raises for that); ``delete`` of a missing block does nothing.
    Payloads are 1-D ``uint8`` tensors; ``read`` returns one on the host.
    """

    name: str  # "G2" | "G3" | "G4"
    capacity_blocks: int | None  # None: no limit of its own (S3)
    shared: bool = False  # every worker of the model reads it (G4)
    in_memory: bool = False  # ``read`` is a lookup, not I/O: the onboard calls it inline (G2)

    @property
    def medium(self) -> str:
        return TIER_MEDIA[self.name]

    @abstractmethod
    def write(self, block_hash: int, header: bytes, payload: torch.Tensor) -> None: ...

    @abstractmethod
    def read(self, block_hash: int) -> tuple[bytes, torch.Tensor] | None: ...

    @abstractmethod
    def delete(self, block_hash: int) -> None: ...

    def list_hashes(self) -> Iterable[int]:
        """Blocks the store holds now, whoever wrote them (shared tiers list; others need not)."""
        return ()

    def start_checksums(self, block_hashes: Sequence[int]) -> DigestsInFlight | None:
        """Start hashing these blocks' payloads away from the caller's GIL (the host tier with
        helper processes); None: the caller hashes what it reads."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: most stores hold nothing open
        """Release what the store holds open (threads, sockets); idempotent."""


def as_host_bytes(payload: torch.Tensor) -> torch.Tensor:
    """``payload`` as a contiguous 1-D ``uint8`` host tensor (a view when it already is one)."""
    flat = payload.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.device.type != "cpu":
        flat = flat.to("cpu")
    return flat.contiguous()


def block_key(block_hash: int) -> str:
    """The file/object name of a block: its hash as 16 hex digits."""
    return f"{block_hash & ((1 << 64) - 1):016x}.kv"


def parse_block_key(name: str) -> int | None:
    """Inverse of ``block_key``; None for names that are not block files."""
    stem, dot, ext = name.rpartition(".")
    if not dot or ext != "kv" or len(stem) != 16:
        return None
    try:
        return int(stem, 16)
    except ValueError:
        return None
