"""G3: local disk. One file per block (``<hash>.kv`` = header || payload) in one directory.

Plain buffered I/O: a block is one sequential write (to a temporary name, then ``os.replace``,
so a reader never sees half a block) and one sequential read. Python's file calls release the
GIL, and the manager runs them on its own threads. NIXL's POSIX backend would need each file
registered before a transfer, which costs more than the copy for one-block files (docs/kv-tiers.md).
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import torch

from serving.kvcache.tier import KVTier, TierIOError, as_host_bytes, block_key, parse_block_key

logger = logging.getLogger(__name__)
_HEADER_LEN = struct.Struct("<H")  # at offset 6 of every header (header.py)


class DiskTier(KVTier):
    """Owns the block files under ``directory``; the directory is this worker's alone.

    Blocks do not outlive the worker: files left by an earlier process are removed at start
    (the stack that indexes them starts empty).
    """

    name = "G3"

    def __init__(self, directory: Path, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"the disk KV tier needs at least one block, got {capacity_blocks}")
        self.directory = Path(directory)
        self.capacity_blocks = capacity_blocks
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the KV disk directory {directory}: {exc}") from None
        stale = [p for p in self.directory.iterdir() if parse_block_key(p.name) is not None]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.info("KV disk tier: removed %d block files of an earlier run", len(stale))

    def path(self, block_hash: int) -> Path:
        return self.directory / block_key(block_hash)

    def write(self, block_hash: int, header: bytes, payload: torch.Tensor) -> None:
        path = self.path(block_hash)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        data = as_host_bytes(payload).numpy()
        try:
            with tmp.open("wb") as f:
                f.write(header)
                f.write(memoryview(data))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise TierIOError(f"cannot write KV block file {path}: {exc}") from exc

    def read(self, block_hash: int) -> tuple[bytes, torch.Tensor] | None:
        path = self.path(block_hash)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = bytearray(size)
                if f.readinto(data) != size:
                    raise TierIOError(f"short read of KV block file {path}")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TierIOError(f"cannot read KV block file {path}: {exc}") from exc
        header_len = _HEADER_LEN.unpack_from(data, 6)[0] if size >= 8 else size
        header_len = min(header_len, size)
        if size == header_len:
            return bytes(data), torch.empty(0, dtype=torch.uint8)
        return bytes(data[:header_len]), torch.frombuffer(
            data, dtype=torch.uint8, offset=header_len
        )

    def delete(self, block_hash: int) -> None:
        self.path(block_hash).unlink(missing_ok=True)

    def list_hashes(self) -> list[int]:
        out = []
        for entry in os.scandir(self.directory):
            block_hash = parse_block_key(entry.name)
            if block_hash is not None:
                out.append(block_hash)
        return out
