"""The KV transport interface, and ``make_transport``, which picks NIXL or TCP and says so.

Pull mode, as vLLM's NIXL connector::

    prefill worker (holds the blocks)          decode worker (pulls them)
    t = make_transport()                         t = make_transport()
    t.register_pool(kv, layout)                  t.register_pool(kv, layout)
    kv_transfer_params <- t.metadata()  ------>  peer = t.connect(metadata)
                                                 t.pull(peer, remote_ids, local_ids)
    t.poll_notifications() -> [(peer, msg)] <--  t.notify(peer, msg)
    free the blocks
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from serving.transfer.layout import BlockLayout

logger = logging.getLogger(__name__)

TransportKind = Literal["nixl", "tcp"]
PeerMetadata = dict[str, Any]


class TransportError(RuntimeError):
    """A transfer, connection or notification failed; the message names the peer and the step."""


class KVTransport(ABC):
    """Moves whole KV blocks from a peer's registered pool into this process's pool.

    Owns its connections, the registration of one pool and the notifications it receives; never
    decides which blocks to move or when to free them (the worker's block manager does).
    """

    kind: TransportKind
    name: str
    choice: TransportChoice | None = None

    @abstractmethod
    def register_pool(self, pool: torch.Tensor, layout: BlockLayout) -> None:
        """Expose ``pool`` (contiguous, CPU or CUDA) to peers and pull into it; call once."""

    @abstractmethod
    def metadata(self) -> PeerMetadata:
        """What a peer passes to ``connect``: small, JSON-able (``kind``, ``name``, host, port)."""

    @abstractmethod
    def connect(self, peer_metadata: PeerMetadata) -> str:
        """Reach the peer and learn its pool's layout; returns the peer's name. Idempotent."""

    @abstractmethod
    def pull(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int]
    ) -> None:
        """Copy the peer's ``remote_block_ids`` onto ``local_block_ids`` as one transfer.

        Blocks until every byte is in the local pool; raises ``TransportError`` on failure (the
        local blocks are then undefined) and ``ValueError`` for ids outside either pool.
        """

    @abstractmethod
    def notify(self, peer: str, message: bytes) -> None:
        """Send ``message`` to a connected peer; it arrives in the peer's ``poll_notifications``."""

    @abstractmethod
    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """Drain the notifications received so far as ``(sender name, message)``, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving, drop connections and the registration. Safe to call twice."""

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class TransportChoice:
    """Which transport ``make_transport`` picked and why: the label of the transfer metrics."""

    kind: TransportKind
    requested: str
    reason: str

    @property
    def is_fallback(self) -> bool:
        return self.requested == "auto" and self.kind != "nixl"


def check_pool(pool: torch.Tensor, layout: BlockLayout) -> None:
    """Raise ``ValueError`` unless ``pool`` is one contiguous tensor spanning ``layout``."""
    if not pool.is_contiguous():
        raise ValueError("the KV pool must be one contiguous tensor")
    pool_bytes = pool.numel() * pool.element_size()
    if pool_bytes != layout.pool_bytes:
        raise ValueError(f"pool has {pool_bytes} bytes, layout {layout} spans {layout.pool_bytes}")


def make_transport(
    kind: Literal["nixl", "tcp", "auto"] = "auto",
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> KVTransport:
    """A transport of ``kind``; ``auto`` takes NIXL when it imports and moves bytes, else TCP.

    ``host``/``port`` are where peers reach this process (port 0: any free one). The choice is
    logged (a WARNING on fallback: TCP is several times slower) and kept in ``transport.choice``.
    An explicit ``nixl`` that does not work raises instead of falling back.
    """
    if kind not in ("nixl", "tcp", "auto"):
        raise ValueError(f"unknown KV transport {kind!r}: expected nixl, tcp or auto")
    if kind == "tcp":
        return _chosen(_make_tcp(name, host, port), kind, "requested explicitly")
    try:
        transport = _make_nixl(name, host, port)
    except Exception as exc:  # ImportError, a missing UCX plugin, a failed self-test
        if kind == "nixl":
            raise TransportError(f"NIXL transport requested but unusable: {exc}") from exc
        reason = f"NIXL unusable ({type(exc).__name__}: {exc})"
        logger.warning(
            "KV transport: falling back to plain TCP because %s; KV transfers will be slower "
            "(install nixl==1.5.1 and nixl-cu12==1.5.1 to use NIXL)",
            reason,
        )
        return _chosen(_make_tcp(name, host, port), kind, reason)
    return _chosen(transport, kind, "NIXL imported and its UCX backend passed a loopback transfer")


def _chosen(transport: KVTransport, requested: str, reason: str) -> KVTransport:
    transport.choice = TransportChoice(kind=transport.kind, requested=requested, reason=reason)
    if not transport.choice.is_fallback:
        logger.info(
            "KV transport: %s (requested %s): %s; peers reach %s",
            transport.kind,
            requested,
            reason,
            transport.metadata(),
        )
    return transport


def _make_nixl(name: str | None, host: str, port: int) -> KVTransport:
    from serving.transfer.nixl_transport import NixlTransport

    transport = NixlTransport(name=name, host=host, port=port)
    try:
        transport.self_test()
    except Exception:
        transport.close()
        raise
    return transport


def _make_tcp(name: str | None, host: str, port: int) -> KVTransport:
    from serving.transfer.tcp_transport import TcpTransport

    return TcpTransport(name=name, host=host, port=port)
