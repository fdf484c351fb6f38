"""KV-event publishing over ZMQ, wire-compatible with vLLM's ``ZmqEventPublisher``.

A PUB socket sends every batch as ``[topic, seq (8-byte big-endian), msgpack payload]``, with
``seq`` counting 0, 1, 2, ... per publisher. A ROUTER socket answers replay requests
``[b"", start_seq]`` from the buffer of recent batches::

    client (DEALER)                 publisher (ROUTER)
    [b"", start_seq]  ------------>
                      <------------ [b"", topic, seq, payload]   for each buffered seq >= start_seq
                      <------------ [b"", topic, END_SEQ, b""]   END_SEQ = -1, 8-byte signed
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque

import zmq

from serving.protocol.kv_events import KVCacheEvent, KVEventBatch, encode_batch

logger = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int | None) -> str | None:
    """Shift a TCP port by the data-parallel rank (vLLM's convention); ``*``/``0`` stay as is."""
    if not endpoint or not data_parallel_rank:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{data_parallel_rank}"
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if port in ("*", "0"):
            return endpoint
        return f"{base}:{int(port) + data_parallel_rank}"
    return endpoint


def _binds(endpoint: str) -> bool:
    """vLLM's heuristic: bind wildcard and local transports, connect to a concrete host:port."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith(("ipc://", "inproc://"))
        or endpoint.endswith(":0")
    )


def _endpoint_port(sock: zmq.Socket) -> int | None:
    last = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    if not last.startswith("tcp://"):
        return None
    return int(last.rpartition(":")[2])


class ZmqEventPublisher:
    """Owns the PUB and replay ROUTER sockets, the sequence counter and the replay buffer.

    ``publish`` only enqueues; one I/O thread encodes, numbers, sends and buffers batches and
    answers replay requests, so the sockets never cross threads after construction. It never
    interprets events: whatever the engine hands over goes out in order.
    """

    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = 10_000,
        data_parallel_rank: int | None = 0,
        hwm: int = 100_000,
    ) -> None:
        self._data_parallel_rank = data_parallel_rank
        self._topic_bytes = topic.encode("utf-8")
        self._queue: queue.SimpleQueue[KVEventBatch | None] = queue.SimpleQueue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0  # owned by the I/O thread once it starts
        self._closed = False
        self._close_lock = threading.Lock()

        ctx = zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._replay: zmq.Socket | None = None
        pub_endpoint = offset_endpoint_port(endpoint, data_parallel_rank)
        assert pub_endpoint is not None
        try:
            if _binds(pub_endpoint):
                self._pub.bind(pub_endpoint)
                self._bound_port = _endpoint_port(self._pub)
            else:
                self._pub.connect(pub_endpoint)
                self._bound_port = None
            replay = offset_endpoint_port(replay_endpoint, data_parallel_rank)
            if replay is not None:
                self._replay = ctx.socket(zmq.ROUTER)
                self._replay.bind(replay)
        except zmq.ZMQError as e:
            self._close_sockets(linger_ms=0)
            raise RuntimeError(f"KV-event publisher cannot use {endpoint!r}: {e}") from e
        self._bound_replay_port = _endpoint_port(self._replay) if self._replay is not None else None

        # The I/O thread sleeps in zmq.Poller; a byte on this pipe wakes it for the queue.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    @property
    def bound_port(self) -> int | None:
        """The PUB socket's TCP port (the real one when bound to ``*`` or 0), else None."""
        return self._bound_port

    @property
    def bound_replay_port(self) -> int | None:
        return self._bound_replay_port

    def publish(self, events: list[KVCacheEvent], ts: float | None = None) -> None:
        """Queue one batch; thread-safe, never blocks on the network. ``ts`` defaults to now."""
        batch = KVEventBatch(
            ts=time.time() if ts is None else ts,
            events=list(events),
            data_parallel_rank=self._data_parallel_rank,
        )
        with self._close_lock:  # a batch queued after the close sentinel would be lost
            if self._closed:
                raise RuntimeError("KV-event publisher is closed")
            self._queue.put(batch)
            self._wake()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send every batch queued so far, stop the I/O thread and close the sockets."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
            self._wake()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("KV-event publisher thread still running after %.1f s", timeout_s)
            return
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> ZmqEventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wake(self) -> None:
        # A full pipe already guarantees a wake-up, so a failed write loses nothing.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        try:
            running = True
            while running:
                ready = dict(poller.poll())
                if self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 65536)
                running = self._drain_queue()
                if self._replay is not None and self._replay in ready:
                    try:
                        self._service_replay()
                    except zmq.ZMQError:
                        logger.exception("KV-event replay failed")
        finally:
            self._close_sockets(linger_ms=1000)

    def _drain_queue(self) -> bool:
        """Send every queued batch; False once the close sentinel is reached."""
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return True
            if batch is None:
                return False
            self._send(batch)

    def _send(self, batch: KVEventBatch) -> None:
        try:
            payload = encode_batch(batch)
        except (TypeError, ValueError, OverflowError):
            logger.exception("dropping a KV-event batch that does not encode")
            return
        seq = self._next_seq
        self._next_seq += 1
        self._pub.send_multipart((self._topic_bytes, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))

    def _service_replay(self) -> None:
        assert self._replay is not None
        while True:
            try:
                frames = self._replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # ROUTER prepends the identity; DEALER/REQ clients add the empty delimiter.
            if len(frames) == 3 and frames[1] == b"":
                envelope = [frames[0], b""]
            elif len(frames) == 2:
                envelope = [frames[0]]
            else:
                logger.warning(
                    "ignoring malformed KV-event replay request (%d frames)", len(frames)
                )
                continue
            start_seq = int.from_bytes(frames[-1], "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    self._replay.send_multipart(
                        [*envelope, self._topic_bytes, seq.to_bytes(8, "big"), payload]
                    )
            self._replay.send_multipart([*envelope, self._topic_bytes, END_SEQ, b""])

    def _close_sockets(self, linger_ms: int) -> None:
        self._pub.close(linger=linger_ms)
        if self._replay is not None:
            self._replay.close(linger=0)


class NullEventPublisher:
    """Drops every batch: the publisher to use when KV events are disabled."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        del args, kwargs

    @property
    def bound_port(self) -> int | None:
        return None

    @property
    def bound_replay_port(self) -> int | None:
        return None

    def publish(self, events: list[KVCacheEvent], ts: float | None = None) -> None:
        del events, ts

    def close(self, timeout_s: float = 5.0) -> None:
        del timeout_s
