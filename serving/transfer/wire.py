"""Framed msgpack messages over TCP sockets, and a small threaded server both transports share.

A frame is an 8-byte big-endian length, then that many bytes of msgpack. Bulk KV bytes never go
in a frame: the TCP transport streams them raw after a frame that announces their length.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

_LENGTH_BYTES = 8
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)  # buffers per sendmsg/recvmsg_into
_MAX_FRAME_BYTES = 1 << 30
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def send_msg(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = _encoder.encode(message)
    sock.sendall(len(payload).to_bytes(_LENGTH_BYTES, "big") + payload)


def recv_msg(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame's message, or ``None`` when the peer closed the connection cleanly."""
    header = bytearray(_LENGTH_BYTES)
    if not recv_into_exact(sock, memoryview(header), eof_ok=True):
        return None
    length = int.from_bytes(header, "big")
    if length > _MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {length} bytes exceeds {_MAX_FRAME_BYTES}")
    payload = bytearray(length)
    recv_into_exact(sock, memoryview(payload))
    return _decoder.decode(payload)


def recv_into_exact(sock: socket.socket, view: memoryview, *, eof_ok: bool = False) -> bool:
    """Fill ``view`` from ``sock``; ``False`` if the peer closed before the first byte (``eof_ok``).

    Bytes land straight in ``view`` (``recv_into``): no intermediate Python copies.
    """
    filled = 0
    total = len(view)
    while filled < total:
        received = sock.recv_into(view[filled:], total - filled)
        if received == 0:
            if eof_ok and filled == 0:
                return False
            raise ConnectionError(f"peer closed after {filled} of {total} bytes")
        filled += received
    return True


def send_views(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Send ``views`` back to back with gathering writes (``sendmsg``, up to IOV_MAX at a time)."""
    _vectored(sock.sendmsg, views, "send")


def recv_into_views(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill ``views`` in order with scattering reads (``recvmsg_into``): bytes land in place."""
    _vectored(sock.recvmsg_into, views, "recv")


def _vectored(call: Callable, views: Sequence[memoryview], what: str) -> None:
    pending = [view for view in views if len(view)]
    start = 0
    while start < len(pending):
        batch = pending[start : start + _IOV_MAX]
        result = call(batch)
        moved = result if what == "send" else result[0]
        if moved == 0:
            raise ConnectionError(f"peer closed during a vectored {what}")
        # Skip the buffers done; trim the one left part-way.
        for view in batch:
            if moved < len(view):
                pending[start] = view[moved:]
                break
            moved -= len(view)
            start += 1


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection with Nagle off and blocking I/O after the connect timeout."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


def advertised_host(bind_host: str) -> str:
    """The address peers dial: ``bind_host`` itself, or this host's address for a wildcard."""
    if bind_host in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(socket.gethostname())
    return bind_host


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


Handler = Callable[[socket.socket], None]


class FrameServer:
    """Accepts connections on (host, port) and runs ``handle(sock)`` for each on its own thread.

    Owns the listening socket and the accepted connections; ``handle`` owns the protocol.
    """

    def __init__(self, host: str, port: int, handle: Handler, thread_name: str) -> None:
        server = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with server._lock:
                    server._conns.add(sock)
                try:
                    handle(sock)
                except (ConnectionError, OSError) as exc:
                    logger.debug("%s: connection ended: %s", thread_name, exc)
                finally:
                    with server._lock:
                        server._conns.discard(sock)

        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server = _TCPServer((host, port), _Handler)
        self.port: int = self._server.server_address[1]
        self.host = advertised_host(host)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=thread_name,
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
