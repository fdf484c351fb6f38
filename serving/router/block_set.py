"""Which blocks one worker holds, per medium, rebuilt from its KV events; no I/O.

Engine block hashes are opaque ids: the tracker keys on them only to link a block to its parent
and to apply removals. Each block's token ids come from its ``BlockStored`` event, so a held
block's full prefix can be rebuilt by walking ``parent_block_hash`` links::

    BlockStored(block_hashes=[a, b], parent=None, token_ids=t[0:32])  ->  a: t[0:16], b: t[16:32]
    BlockStored(block_hashes=[c], parent=b, token_ids=t[32:48])       ->  prefix(c) = t[0:48]
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
)

DEFAULT_MEDIUM = "GPU"  # vLLM's meaning of an event without a medium


@dataclass(frozen=True)
class HeldBlock:
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    lora_name: str | None


class BlockSetTracker:
    """Owns the per-medium sets of held block hashes and each held block's tokens; no I/O.

    A block's data stays known while at least one medium holds it.
    """

    def __init__(self) -> None:
        self._medium_to_hashes: dict[str, set[BlockHash]] = {}
        self._hash_to_block: dict[BlockHash, HeldBlock] = {}

    def apply(self, events: list[KVCacheEvent]) -> None:
        for event in events:
            self.apply_event(event)

    def apply_event(self, event: KVCacheEvent) -> None:
        if isinstance(event, BlockStored):
            self._store(event)
        elif isinstance(event, BlockRemoved):
            self._remove(event.block_hashes, event.medium or DEFAULT_MEDIUM)
        elif isinstance(event, AllBlocksCleared):
            self._medium_to_hashes.clear()
            self._hash_to_block.clear()
        else:
            raise TypeError(f"not a KV cache event: {event!r}")

    def media(self) -> set[str]:
        return {m for m, hashes in self._medium_to_hashes.items() if hashes}

    def held_hashes(self, medium: str = DEFAULT_MEDIUM) -> frozenset[BlockHash]:
        return frozenset(self._medium_to_hashes.get(medium, ()))

    def block(self, block_hash: BlockHash) -> HeldBlock:
        """The held block's parent link, own token ids and LoRA; KeyError when not held."""
        return self._hash_to_block[block_hash]

    def prefix_token_ids(self, block_hash: BlockHash) -> list[int] | None:
        """Token ids from the chain's root through ``block_hash``; None when a link is unknown."""
        chain: list[tuple[int, ...]] = []
        current: BlockHash | None = block_hash
        while current is not None:
            held = self._hash_to_block.get(current)
            if held is None:
                return None
            chain.append(held.token_ids)
            current = held.parent_block_hash
        return [token for block_tokens in reversed(chain) for token in block_tokens]

    def held_prefixes(self, medium: str = DEFAULT_MEDIUM) -> dict[BlockHash, list[int] | None]:
        """For each block the medium holds, its full prefix (see ``prefix_token_ids``)."""
        return {h: self.prefix_token_ids(h) for h in self._medium_to_hashes.get(medium, ())}

    def _store(self, event: BlockStored) -> None:
        num_blocks = len(event.block_hashes)
        if len(event.token_ids) != num_blocks * event.block_size:
            raise ValueError(
                f"BlockStored has {len(event.token_ids)} token ids for {num_blocks} blocks "
                f"of {event.block_size}"
            )
        held = self._medium_to_hashes.setdefault(event.medium or DEFAULT_MEDIUM, set())
        parent = event.parent_block_hash
        for i, block_hash in enumerate(event.block_hashes):
            start = i * event.block_size
            self._hash_to_block[block_hash] = HeldBlock(
                parent_block_hash=parent,
                token_ids=tuple(event.token_ids[start : start + event.block_size]),
                lora_name=event.lora_name,
            )
            held.add(block_hash)
            parent = block_hash

    def _remove(self, block_hashes: list[BlockHash], medium: str) -> None:
        held = self._medium_to_hashes.get(medium, set())
        for block_hash in block_hashes:
            held.discard(block_hash)
            if not any(block_hash in hashes for hashes in self._medium_to_hashes.values()):
                self._hash_to_block.pop(block_hash, None)
