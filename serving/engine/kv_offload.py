"""KV tiers below the device, as the engine sees them: plain values and one hook. No I/O.

The scheduler asks a ``TierHook`` (``serving.kvcache.stack.TierStack``) where a waiting
request's prefix continues after its G1 (device) hit. When the hook's cost check says the
lower-tier blocks are cheaper to move than to recompute, the request gets blocks for them and
waits, as a remote-prefill request does (``WAITING_FOR_REMOTE_KVS``), while its owner copies
them in off the step thread (``KVOnboard``); then ``EngineCore.finish_kv_onboard`` lets it run.
Its blocks are not findable by other requests until they count as computed.

After each step, blocks that became full and indexed (``NewBlock``) are offered to the hook,
which plans copies down (write-through); the engine holds a reference on each block being
copied until the copy is reported done, so it is never reused under the copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class NewBlock:
    """A device block that became full and indexed: what a lower tier needs to store it."""

    block_id: int
    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KVOnboard:
    """Lower-tier blocks to copy into this engine's pool for one waiting request.

    ``block_hashes[i]`` is read from tier ``tiers[i]`` into device block ``local_block_ids[i]``;
    together they hold prompt tokens ``[first_token, first_token + num_tokens)``. A block that
    fails its checks ends the run: the request recomputes from there.
    """

    request_id: str
    block_hashes: tuple[int, ...]
    tiers: tuple[str, ...]
    local_block_ids: tuple[int, ...]
    first_token: int
    num_tokens: int


class TierLookupResult(Protocol):
    """Where a prefix continues below G1 and how much of it the cost check onboards."""

    @property
    def num_onboard_blocks(self) -> int: ...

    @property
    def run_tiers(self) -> tuple[str, ...]: ...

    def onboard_hashes(self) -> tuple[int, ...]: ...


class TierHook(Protocol):
    """What the scheduler and the engine core need from the tier stack (engine thread only)."""

    def lookup(self, block_hashes: Sequence[int], num_g1_blocks: int) -> Any: ...

    def commit(self, lookup: Any, onboard: KVOnboard | None) -> None: ...

    def on_blocks_computed(self, blocks: Sequence[NewBlock]) -> list[int]: ...
