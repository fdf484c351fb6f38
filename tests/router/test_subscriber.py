"""KVEventSubscriber against a real ZmqEventPublisher (and a test PUB that drops frames)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq

from serving.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    encode_batch,
)
from serving.router.subscriber import (
    KVEventSubscriber,
    KVEventSubscriberThread,
    decode_batch_lenient,
)
from serving.worker.kv_events import ZmqEventPublisher

WAIT_S = 10.0
Delivered = list[tuple[int, KVEventBatch]]


def make_batch(i: int) -> KVEventBatch:
    event = BlockStored(
        block_hashes=[100 + i],
        parent_block_hash=99 + i if i else None,
        token_ids=[i, i + 1],
        block_size=2,
    )
    return KVEventBatch(float(i), [event], 0)


@pytest.fixture
def publisher() -> Iterator[ZmqEventPublisher]:
    pub = ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    yield pub
    pub.close()


@pytest.fixture
def test_pub() -> Iterator[tuple[zmq.Socket, str]]:
    """A bare PUB the test controls, to deliver, repeat or drop frames at will."""
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    sock.close()


def replay_endpoint(pub: ZmqEventPublisher) -> str:
    return f"tcp://127.0.0.1:{pub.bound_replay_port}"


def send(sock: zmq.Socket, seq: int, batch: KVEventBatch) -> None:
    sock.send_multipart([b"", seq.to_bytes(8, "big"), encode_batch(batch)])


def poll_until(
    sub: KVEventSubscriber,
    delivered: Delivered,
    done: Callable[[], bool],
    probe: Callable[[], None],
) -> None:
    """Call ``probe`` and poll until ``done``: probing covers the PUB/SUB slow joiner."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"timed out; delivered {[s for s, _ in delivered]}"
        probe()
        delivered.extend(sub.poll(50))


def test_late_subscriber_is_filled_from_replay(publisher: ZmqEventPublisher) -> None:
    for i in range(3):
        publisher.publish(make_batch(i).events, ts=float(i))
    num_published = 3
    sub = KVEventSubscriber(
        f"tcp://127.0.0.1:{publisher.bound_port}", replay_endpoint=replay_endpoint(publisher)
    )
    delivered: Delivered = []

    def probe() -> None:
        nonlocal num_published
        publisher.publish([])
        num_published += 1

    # Whichever probe arrives first reveals the gap 0..seq-1, which the replay fills.
    poll_until(sub, delivered, lambda: len(delivered) == num_published, probe)
    for i in range(3, 6):
        publisher.publish(make_batch(i).events, ts=float(i))
    num_published += 3
    poll_until(sub, delivered, lambda: len(delivered) == num_published, lambda: None)
    assert [seq for seq, _ in delivered] == list(range(num_published))
    assert [b for _, b in delivered[:3]] == [make_batch(i) for i in range(3)]
    assert [b for _, b in delivered[-3:]] == [make_batch(i) for i in range(3, 6)]
    assert sub.last_seq == num_published - 1
    assert sub.num_lost_batches == 0 and sub.num_restarts == 0
    sub.close()


def test_dropped_frames_are_filled_once_in_order(
    publisher: ZmqEventPublisher, test_pub: tuple[zmq.Socket, str]
) -> None:
    sock, endpoint = test_pub
    batches = [make_batch(i) for i in range(10)]
    for batch in batches[:5]:
        publisher.publish(batch.events, ts=batch.ts)
    sub = KVEventSubscriber(endpoint, replay_endpoint=replay_endpoint(publisher))
    delivered: Delivered = []
    # Only seq 4 goes out live (repeatedly, until the subscription is up): 0..3 come by replay,
    # and the repeats of 4 are duplicates of what the replay returned.
    poll_until(sub, delivered, lambda: bool(delivered), lambda: send(sock, 4, batches[4]))
    for batch in batches[5:]:
        publisher.publish(batch.events, ts=batch.ts)
    for seq in (5, 6, 9):  # 7 and 8 are lost on the way
        send(sock, seq, batches[seq])
    poll_until(sub, delivered, lambda: sub.last_seq == 9, lambda: None)
    assert delivered == list(enumerate(batches))
    assert sub.num_lost_batches == 0
    sub.close()


def test_gap_without_replay_is_counted_and_restart_detected(
    test_pub: tuple[zmq.Socket, str],
) -> None:
    sock, endpoint = test_pub
    sub = KVEventSubscriber(endpoint)
    delivered: Delivered = []
    probes = iter(range(1000))
    poll_until(
        sub, delivered, lambda: bool(delivered), lambda: send(sock, next(probes), make_batch(0))
    )
    first = delivered[0][0]  # earlier probes never reached the SUB: those count as lost
    last_probe = next(probes) - 1
    for seq in (last_probe + 1, last_probe + 4, 0, 1):  # a gap, then the publisher restarts
        send(sock, seq, make_batch(seq))
    expected = [*range(first, last_probe + 2), last_probe + 4, 0, 1]
    poll_until(sub, delivered, lambda: len(delivered) >= len(expected), lambda: None)
    assert [s for s, _ in delivered] == expected
    assert sub.num_lost_batches == first + 2
    assert sub.num_restarts == 1
    sub.close()


def test_unknown_event_type_is_skipped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    known = {"type": "BlockRemoved", "block_hashes": [5], "medium": "CPU"}
    unknown = {"type": "BlockMoved", "block_hashes": [5], "to": "disk"}
    payload = msgspec.msgpack.encode([7.5, [known, unknown, {"type": "AllBlocksCleared"}], 0])
    with caplog.at_level(logging.WARNING, logger="serving.router.subscriber"):
        batch = decode_batch_lenient(payload)
    assert batch == KVEventBatch(
        7.5, [BlockRemoved(block_hashes=[5], medium="CPU"), AllBlocksCleared()], 0
    )
    assert "BlockMoved" in caplog.text
    with pytest.raises(msgspec.DecodeError):
        decode_batch_lenient(b"\xc1")


def test_unknown_event_type_passes_through_subscriber(test_pub: tuple[zmq.Socket, str]) -> None:
    sock, endpoint = test_pub
    sub = KVEventSubscriber(endpoint)
    payload = msgspec.msgpack.encode([1.0, [{"type": "Mystery"}, {"type": "AllBlocksCleared"}], 0])
    delivered: Delivered = []
    seqs = iter(range(1000))
    poll_until(
        sub,
        delivered,
        lambda: bool(delivered),
        lambda: sock.send_multipart([b"", next(seqs).to_bytes(8, "big"), payload]),
    )
    assert delivered[0][1].events == [AllBlocksCleared()]
    sub.close()


def test_thread_wrapper_catches_up_then_follows(publisher: ZmqEventPublisher) -> None:
    for i in range(5):
        publisher.publish(make_batch(i).events, ts=float(i))
    received: Delivered = []
    changed = threading.Condition()

    def on_batch(seq: int, batch: KVEventBatch) -> None:
        with changed:
            received.append((seq, batch))
            changed.notify_all()

    sub = KVEventSubscriber(
        f"tcp://127.0.0.1:{publisher.bound_port}", replay_endpoint=replay_endpoint(publisher)
    )
    runner = KVEventSubscriberThread(sub, on_batch, poll_timeout_ms=20)
    runner.start()
    num_published = 5
    deadline = time.monotonic() + WAIT_S
    with changed:
        # Catch-up replays what is buffered; probes go on until the live stream (with gaps
        # filled from replay) has delivered every batch published so far.
        while len(received) < num_published:
            assert time.monotonic() < deadline, f"received {[s for s, _ in received]}"
            publisher.publish([])
            num_published += 1
            changed.wait(0.05)
    runner.stop()
    assert [s for s, _ in received] == list(range(num_published))
    assert [b for _, b in received[:5]] == [make_batch(i) for i in range(5)]
