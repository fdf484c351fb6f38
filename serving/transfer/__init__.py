"""KV block transfer between workers: NIXL (UCX) where it works, plain TCP otherwise.

``make_transport`` picks one and logs the choice; ``KVTransport`` is the interface both share;
``BlockLayout`` maps block ids to byte runs of the engine's KV cache. See ``docs/transfer.md``.
"""

from serving.transfer.base import (
    KVTransport,
    PeerMetadata,
    TransportChoice,
    TransportError,
    make_transport,
)
from serving.transfer.layout import BlockLayout, TransferPlan, plan_transfer

__all__ = [
    "BlockLayout",
    "KVTransport",
    "PeerMetadata",
    "TransferPlan",
    "TransportChoice",
    "TransportError",
    "make_transport",
    "plan_transfer",
]
