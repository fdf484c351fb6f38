"""Chained block hashes over token ids, shared by the engine's prefix cache and the router.

``local = XXH3-64(token ids as little-endian u32, seed)`` per block, and
``seq[i] = XXH3-64(seq[i-1] (8 bytes LE) || local[i] (8 bytes LE), seed)``; the first block's
parent is the salt (0 unless a LoRA or tenant salts the chain). Only full blocks are hashed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

HASH_SEED = 1337


def hash_block_tokens(token_ids: Sequence[int]) -> int:
    """XXH3-64 of one block's token ids encoded as little-endian u32."""
    data = np.asarray(token_ids, dtype="<u4").tobytes()
    return xxhash.xxh3_64_intdigest(data, seed=HASH_SEED)


def chain_hash(parent_hash: int, local_hash: int) -> int:
    data = parent_hash.to_bytes(8, "little") + local_hash.to_bytes(8, "little")
    return xxhash.xxh3_64_intdigest(data, seed=HASH_SEED)


def salt_for(name: str | None) -> int:
    """Chain root for a LoRA adapter or tenant; 0 for the base model."""
    if not name:
        return 0
    return xxhash.xxh3_64_intdigest(name.encode(), seed=HASH_SEED)


def hash_token_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent_hash: int | None = None,
    salt: int = 0,
) -> list[int]:
    """Chained hashes of every full block of ``token_ids``, continuing from ``parent_hash``."""
    hashes: list[int] = []
    prev = salt if parent_hash is None else parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = chain_hash(prev, hash_block_tokens(token_ids[start : start + block_size]))
        hashes.append(prev)
    return hashes
