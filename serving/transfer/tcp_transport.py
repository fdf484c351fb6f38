"""KV transport over plain TCP: the fallback where NIXL is missing or broken.

Each process serves its registered pool on (host, port). A puller keeps one connection per
peer and speaks framed msgpack (``wire.py``) on it::

    puller                                        server (thread per connection)
    {"op": "hello", "name": me}          ---->
                                         <----    {"name": server, "layout": {...}}
    {"op": "read", "offsets", "lengths"} ---->
                                         <----    {"ok": true, "num_bytes": n}, then n raw bytes
    {"op": "notify", "message": b"..."}  ---->    queued for poll_notifications

The raw bytes go from the server's pool into ``sendall`` and from the socket into the puller's
pool with ``recv_into`` on memoryviews of the pools (CPU pools: no copies beyond the socket's;
CUDA pools stage through one pinned host buffer per transfer).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from serving.transfer.base import KVTransport, PeerMetadata, TransportError, check_pool
from serving.transfer.layout import BlockLayout, TransferPlan, plan_transfer
from serving.transfer.wire import (
    FrameServer,
    connect,
    recv_into_exact,
    recv_into_views,
    recv_msg,
    send_msg,
    send_views,
)

logger = logging.getLogger(__name__)


class PoolBytes:
    """Byte-level access to a registered pool: runs out to a socket, runs in from one.

    A CPU pool is read and written in place. A CUDA pool goes through a pinned host buffer, kept
    between transfers and used by one transfer at a time: runs made of whole ``unit_bytes``
    units (blocks) are gathered or scattered on the device with one ``index_select`` /
    ``index_copy_`` and cross PCIe in one copy; other runs are copied one by one.
    """

    def __init__(self, pool: torch.Tensor, unit_bytes: int) -> None:
        self.tensor = pool
        self.flat = pool.reshape(-1).view(torch.uint8)
        self.num_bytes = self.flat.numel()
        self.unit_bytes = unit_bytes
        self.view = None if pool.is_cuda else memoryview(self.flat.numpy())
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._staging_lock = threading.Lock()

    def send_runs(self, sock: socket.socket, offsets: np.ndarray, lengths: np.ndarray) -> None:
        if self.view is not None:
            send_views(sock, self._views(offsets, lengths))
            return
        with self._staging_lock:
            staging = self._pinned(int(lengths.sum()))
            units = self._unit_index(offsets, lengths)
            if units is not None:
                gathered = self.flat.view(-1, self.unit_bytes).index_select(0, units)
                staging.view(-1, self.unit_bytes).copy_(gathered, non_blocking=True)
            else:
                for pos, offset, length in _runs(offsets, lengths):
                    src = self.flat[offset : offset + length]
                    staging[pos : pos + length].copy_(src, non_blocking=True)
            torch.cuda.current_stream(self.flat.device).synchronize()
            sock.sendall(memoryview(staging.numpy()))

    def recv_runs(self, sock: socket.socket, offsets: np.ndarray, lengths: np.ndarray) -> None:
        if self.view is not None:
            recv_into_views(sock, self._views(offsets, lengths))
            return
        with self._staging_lock:
            staging = self._pinned(int(lengths.sum()))
            recv_into_exact(sock, memoryview(staging.numpy()))
            units = self._unit_index(offsets, lengths)
            if units is not None:
                received = staging.view(-1, self.unit_bytes).to(self.flat.device, non_blocking=True)
                self.flat.view(-1, self.unit_bytes).index_copy_(0, units, received)
            else:
                for pos, offset, length in _runs(offsets, lengths):
                    src = staging[pos : pos + length]
                    self.flat[offset : offset + length].copy_(src, non_blocking=True)
            torch.cuda.current_stream(self.flat.device).synchronize()

    def _unit_index(self, offsets: np.ndarray, lengths: np.ndarray) -> torch.Tensor | None:
        """Device index of every unit the runs cover, in run order; ``None`` if not unit-aligned."""
        unit = self.unit_bytes
        if self.num_bytes % unit or (offsets % unit).any() or (lengths % unit).any():
            return None
        counts = lengths // unit
        run_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        index = np.repeat(offsets // unit - run_starts, counts) + np.arange(int(counts.sum()))
        return torch.from_numpy(index).to(self.flat.device)

    def _pinned(self, num_bytes: int) -> torch.Tensor:
        """The first ``num_bytes`` of a pinned host buffer kept between transfers (grows)."""
        if self._staging.numel() < num_bytes:
            self._staging = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        return self._staging[:num_bytes]

    def _views(self, offsets: np.ndarray, lengths: np.ndarray) -> list[memoryview]:
        view = self.view
        assert view is not None
        ends = offsets + lengths
        return [view[start:end] for start, end in zip(offsets.tolist(), ends.tolist(), strict=True)]


def _runs(offsets: np.ndarray, lengths: np.ndarray):
    positions = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return zip(positions.tolist(), offsets.tolist(), lengths.tolist(), strict=True)


@dataclass
class _Peer:
    name: str
    layout: BlockLayout
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)


class TcpTransport(KVTransport):
    """Serves its pool's block bytes to pullers and pulls peers' blocks into it, over TCP.

    Owns the server thread, one client socket per connected peer and the notification queue.
    """

    kind = "tcp"

    def __init__(
        self,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        self.name = name or f"strata-tcp-{uuid.uuid4().hex[:12]}"
        self.timeout_s = timeout_s
        self._pool: PoolBytes | None = None
        self._layout: BlockLayout | None = None
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._notifications: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._server = FrameServer(host, port, self._serve, thread_name=f"kv-tcp-{self.name}")
        self._closed = False

    def register_pool(self, pool: torch.Tensor, layout: BlockLayout) -> None:
        if self._pool is not None:
            raise RuntimeError(f"{self.name}: a pool is already registered")
        check_pool(pool, layout)
        self._pool = PoolBytes(pool, layout.block_bytes)
        self._layout = layout

    def metadata(self) -> PeerMetadata:
        return {
            "kind": self.kind,
            "name": self.name,
            "host": self._server.host,
            "port": self._server.port,
        }

    def connect(self, peer_metadata: PeerMetadata) -> str:
        if peer_metadata.get("kind") != self.kind:
            raise TransportError(f"{self.name}: cannot reach a {peer_metadata.get('kind')} peer")
        name = peer_metadata["name"]
        with self._peers_lock:
            if name in self._peers:
                return name
        host, port = peer_metadata["host"], int(peer_metadata["port"])
        try:
            sock = connect(host, port, self.timeout_s)
            sock.settimeout(self.timeout_s)
            send_msg(sock, {"op": "hello", "name": self.name})
            reply = recv_msg(sock)
        except OSError as exc:
            where = f"{name} at {host}:{port}"
            raise TransportError(f"{self.name}: connecting to {where}: {exc}") from exc
        if reply is None or reply.get("layout") is None:
            sock.close()
            raise TransportError(f"{self.name}: peer {name} at {host}:{port} has no pool")
        with self._peers_lock:
            self._peers[name] = _Peer(name, BlockLayout.from_dict(reply["layout"]), sock)
        return name

    def pull(
        self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int]
    ) -> None:
        state = self._peer(peer)
        pool, layout = self._require_pool()
        plan = plan_transfer(state.layout, remote_block_ids, layout, local_block_ids)
        if not len(plan):
            return
        with state.lock:
            try:
                self._read(state, pool, plan)
            except (OSError, ConnectionError) as exc:
                self._drop(peer)
                raise TransportError(f"{self.name}: pulling from {peer}: {exc}") from exc

    def notify(self, peer: str, message: bytes) -> None:
        state = self._peer(peer)
        with state.lock:
            try:
                send_msg(state.sock, {"op": "notify", "message": bytes(message)})
            except OSError as exc:
                self._drop(peer)
                raise TransportError(f"{self.name}: notifying {peer}: {exc}") from exc

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        drained = []
        while True:
            try:
                drained.append(self._notifications.get_nowait())
            except queue.Empty:
                return drained

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.close()
        with self._peers_lock:
            peers, self._peers = list(self._peers.values()), {}
        for state in peers:
            state.sock.close()

    def _read(self, state: _Peer, pool: PoolBytes, plan: TransferPlan) -> None:
        send_msg(
            state.sock,
            {
                "op": "read",
                "offsets": plan.remote_offsets.astype("<i8").tobytes(),
                "lengths": plan.lengths.astype("<i8").tobytes(),
            },
        )
        reply = recv_msg(state.sock)
        if reply is None:
            raise ConnectionError("peer closed the connection")
        if not reply.get("ok"):
            raise TransportError(f"{self.name}: peer {state.name} refused: {reply.get('error')}")
        if reply["num_bytes"] != plan.num_bytes:
            raise ConnectionError(f"peer sends {reply['num_bytes']} bytes, {plan.num_bytes} asked")
        pool.recv_runs(state.sock, plan.local_offsets, plan.lengths)

    def _serve(self, sock: socket.socket) -> None:
        """One connection's loop (server thread): hello, then reads and notifications."""
        hello = recv_msg(sock)
        if hello is None or hello.get("op") != "hello":
            return
        peer = str(hello.get("name"))
        layout = self._layout.to_dict() if self._layout is not None else None
        send_msg(sock, {"name": self.name, "layout": layout})
        while (request := recv_msg(sock)) is not None:
            op = request.get("op")
            if op == "notify":
                self._notifications.put((peer, bytes(request["message"])))
            elif op == "read":
                self._serve_read(sock, request)
            else:
                logger.warning("%s: unknown request %r from %s", self.name, op, peer)

    def _serve_read(self, sock: socket.socket, request: dict) -> None:
        offsets = np.frombuffer(request["offsets"], dtype="<i8")
        lengths = np.frombuffer(request["lengths"], dtype="<i8")
        pool = self._pool
        error = None
        if pool is None:
            error = "no pool registered"
        elif len(offsets) != len(lengths) or (
            len(offsets) and (offsets.min() < 0 or (offsets + lengths).max() > pool.num_bytes)
        ):
            error = f"byte runs outside the pool's {pool.num_bytes} bytes"
        if error is not None:
            send_msg(sock, {"ok": False, "error": error})
            return
        send_msg(sock, {"ok": True, "num_bytes": int(lengths.sum())})
        pool.send_runs(sock, offsets, lengths)

    def _peer(self, peer: str) -> _Peer:
        with self._peers_lock:
            state = self._peers.get(peer)
        if state is None:
            raise TransportError(f"{self.name}: not connected to {peer!r}; call connect first")
        return state

    def _drop(self, peer: str) -> None:
        with self._peers_lock:
            state = self._peers.pop(peer, None)
        if state is not None:
            state.sock.close()

    def _require_pool(self) -> tuple[PoolBytes, BlockLayout]:
        if self._pool is None or self._layout is None:
            raise RuntimeError(f"{self.name}: register_pool first")
        return self._pool, self._layout
