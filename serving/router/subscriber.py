"""KV events in: one worker's ZMQ stream, gap-filled from its replay socket.

The router runs one ``KVEventSubscriber`` per worker, either in a ``KVEventSubscriberThread``
with a callback or by calling ``poll`` from its own loop (for asyncio, in an executor thread).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import msgspec
import zmq

from serving.protocol.kv_events import KVCacheEvent, KVEventBatch, decode_batch

logger = logging.getLogger(__name__)

# The replay socket ends every answer with this sequence number and an empty payload.
REPLAY_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class _RawBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_raw_batch_decoder = msgspec.msgpack.Decoder(_RawBatch)
_event_decoder = msgspec.msgpack.Decoder(KVCacheEvent)


def _event_type(raw_event: msgspec.Raw) -> object:
    try:
        value = msgspec.msgpack.decode(raw_event)
    except msgspec.DecodeError:
        return "<undecodable>"
    return value.get("type") if isinstance(value, dict) else type(value).__name__


def decode_batch_lenient(payload: bytes) -> KVEventBatch:
    """``decode_batch``, except that an event of unknown type or shape is skipped with a warning.

    Raises ``msgspec.DecodeError``/``msgspec.ValidationError`` only when the batch itself is bad.
    """
    try:
        return decode_batch(payload)
    except msgspec.ValidationError:
        raw = _raw_batch_decoder.decode(payload)
    events: list[KVCacheEvent] = []
    for raw_event in raw.events:
        try:
            events.append(_event_decoder.decode(raw_event))
        except msgspec.ValidationError as e:
            logger.warning("skipping KV event of type %r: %s", _event_type(raw_event), e)
    return KVEventBatch(ts=raw.ts, events=events, data_parallel_rank=raw.data_parallel_rank)


class KVEventSubscriber:
    """Owns one worker's SUB and replay DEALER sockets and its stream position.

    Delivers every batch exactly once and in sequence order: a jump in ``seq`` is filled from
    the replay socket before the later batch is delivered. Batches the publisher no longer
    buffers are counted in ``num_lost_batches`` and skipped. It never interprets events.
    Not thread-safe: one thread calls ``poll``/``catch_up``/``close``.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        start_seq: int = 0,
        replay_timeout_ms: int = 2000,
    ) -> None:
        self._ctx = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        self._sub.connect(endpoint)
        self._replay_endpoint = replay_endpoint
        self._replay: zmq.Socket | None = None
        self._replay_timeout_ms = replay_timeout_ms
        self._next_seq = start_seq
        self._last_seq: int | None = None
        # Seqs delivered by the last replay that may still arrive live: those are duplicates.
        self._replayed = range(0)
        self.num_lost_batches = 0
        self.num_restarts = 0

    @property
    def last_seq(self) -> int | None:
        """Sequence number of the last delivered batch; None before the first."""
        return self._last_seq

    def poll(self, timeout_ms: int = 0) -> list[tuple[int, KVEventBatch]]:
        """Wait up to ``timeout_ms`` for a message, then return every batch ready, in order.

        Returns ``(seq, batch)`` pairs; the list is empty when nothing arrived in time.
        """
        out: list[tuple[int, KVEventBatch]] = []
        if not self._sub.poll(timeout_ms):
            return out
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            self._on_message(frames, out)

    def catch_up(self) -> list[tuple[int, KVEventBatch]]:
        """Ask the replay socket for everything from the next expected seq (e.g. at start-up,
        to learn the state of a worker that is idle now)."""
        out: list[tuple[int, KVEventBatch]] = []
        if self._replay_endpoint is not None:
            self._replay_from_next(out)
        return out

    def close(self) -> None:
        self._sub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None

    def _on_message(self, frames: list[bytes], out: list[tuple[int, KVEventBatch]]) -> None:
        if len(frames) != 3:
            logger.warning("ignoring KV-event message with %d frames", len(frames))
            return
        _topic, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big")
        if seq < self._next_seq:
            if seq in self._replayed:
                return
            logger.warning(
                "KV-event seq went back from %d to %d: publisher restarted", self._next_seq, seq
            )
            self.num_restarts += 1
            self._next_seq = 0
        if seq > self._next_seq and self._replay_endpoint is not None:
            self._replay_from_next(out)
            if seq < self._next_seq:
                return
        else:
            self._replayed = range(0)  # the live stream has caught up: no duplicates left
        self._deliver(seq, payload, out)

    def _replay_from_next(self, out: list[tuple[int, KVEventBatch]]) -> None:
        start = self._next_seq
        for seq, payload in self._request_replay(start):
            if seq >= self._next_seq:
                self._deliver(seq, payload, out)
        self._replayed = range(start, self._next_seq)

    def _deliver(self, seq: int, payload: bytes, out: list[tuple[int, KVEventBatch]]) -> None:
        if seq > self._next_seq:
            lost = seq - self._next_seq
            self.num_lost_batches += lost
            logger.warning("lost KV-event batches %d..%d (not replayable)", self._next_seq, seq - 1)
        self._next_seq = seq + 1
        try:
            batch = decode_batch_lenient(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.num_lost_batches += 1
            logger.warning("dropping undecodable KV-event batch seq=%d: %s", seq, e)
            return
        self._last_seq = seq
        out.append((seq, batch))

    def _request_replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        """``[(seq, payload)]`` the publisher still buffers from ``start_seq`` on, in order."""
        assert self._replay_endpoint is not None
        if self._replay is None:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.connect(self._replay_endpoint)
        self._replay.send_multipart([b"", start_seq.to_bytes(8, "big")])
        replies: list[tuple[int, bytes]] = []
        while self._replay.poll(self._replay_timeout_ms):
            frames = self._replay.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) not in (2, 3):  # [topic, seq, payload]; older vLLM omits topic
                logger.warning("ignoring KV-event replay reply with %d frames", len(frames))
                continue
            seq_bytes, payload = frames[-2], frames[-1]
            if seq_bytes == REPLAY_END_SEQ:
                return replies
            replies.append((int.from_bytes(seq_bytes, "big"), payload))
        # A late answer would be taken for the next request's: start over with a new socket.
        logger.warning("KV-event replay from %s timed out", self._replay_endpoint)
        self._replay.close(linger=0)
        self._replay = None
        return replies


class KVEventSubscriberThread:
    """Runs a ``KVEventSubscriber`` in a daemon thread and hands each batch to ``callback``.

    The subscriber belongs to the thread from ``start`` until ``stop`` closes it. For asyncio,
    the callback can forward batches with ``loop.call_soon_threadsafe``.
    """

    def __init__(
        self,
        subscriber: KVEventSubscriber,
        callback: Callable[[int, KVEventBatch], None],
        poll_timeout_ms: int = 100,
        catch_up: bool = True,
    ) -> None:
        self._subscriber = subscriber
        self._callback = callback
        self._poll_timeout_ms = poll_timeout_ms
        self._catch_up = catch_up
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-event-subscriber", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def num_lost_batches(self) -> int:
        """Batches the publisher could no longer replay (read from another thread: a hint)."""
        return self._subscriber.num_lost_batches

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._subscriber.close()

    def _run(self) -> None:
        if self._catch_up:
            self._hand_over(self._subscriber.catch_up())
        while not self._stop.is_set():
            self._hand_over(self._subscriber.poll(self._poll_timeout_ms))

    def _hand_over(self, batches: list[tuple[int, KVEventBatch]]) -> None:
        for seq, batch in batches:
            try:
                self._callback(seq, batch)
            except Exception:
                logger.exception("KV-event callback failed on seq %d", seq)
