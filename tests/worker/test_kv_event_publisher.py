"""ZmqEventPublisher over real ZMQ on loopback, checked against vLLM's captured frames."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from serving.protocol.kv_events import AllBlocksCleared, BlockRemoved, KVEventBatch, decode_batch
from serving.worker.kv_events import (
    END_SEQ,
    NullEventPublisher,
    ZmqEventPublisher,
    offset_endpoint_port,
)
from tests.vllm_vectors import load_vector

WAIT_S = 10.0


def vector_batches() -> list[KVEventBatch]:
    return [
        decode_batch(bytes.fromhex(f["payload_hex"])) for f in load_vector("vllm_kv_events.jsonl")
    ]


@pytest.fixture
def publisher() -> Iterator[ZmqEventPublisher]:
    pub = ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    yield pub
    pub.close()


@pytest.fixture
def ctx() -> zmq.Context:
    return zmq.Context.instance()


def connect_sub(ctx: zmq.Context, port: int | None) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(f"tcp://127.0.0.1:{port}")
    return sub


def sync_sub(publisher: ZmqEventPublisher, sub: zmq.Socket) -> int:
    """Publish empty probe batches until the SUB sees one (PUB drops messages until the
    subscription has arrived); return the seq of the last probe, which the SUB has seen."""
    deadline = time.monotonic() + WAIT_S
    num_probes = 0
    while time.monotonic() < deadline:
        publisher.publish([])
        num_probes += 1
        if sub.poll(50):
            break
    else:
        pytest.fail("SUB never received a probe")
    while True:  # drain the probes in flight; the last one is num_probes - 1
        _topic, seq, _payload = sub.recv_multipart()
        if int.from_bytes(seq, "big") == num_probes - 1:
            return num_probes - 1
        assert sub.poll(int(WAIT_S * 1000))


def request_replay(ctx: zmq.Context, port: int | None, start_seq: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
    replies: list[list[bytes]] = []
    try:
        while True:
            assert dealer.poll(int(WAIT_S * 1000)), "replay socket did not answer"
            replies.append(dealer.recv_multipart())
            if replies[-1][2] == END_SEQ:
                return replies
    finally:
        dealer.close()


def test_sub_receives_consecutive_seqs_and_payloads(
    publisher: ZmqEventPublisher, ctx: zmq.Context
) -> None:
    sub = connect_sub(ctx, publisher.bound_port)
    last_probe = sync_sub(publisher, sub)
    batches = vector_batches()[:3]
    for batch in batches:
        publisher.publish(batch.events, ts=batch.ts)
    frames = load_vector("vllm_kv_events.jsonl")
    for i, batch in enumerate(batches):
        assert sub.poll(int(WAIT_S * 1000))
        topic, seq, payload = sub.recv_multipart()
        assert topic == b""
        assert int.from_bytes(seq, "big") == last_probe + 1 + i
        assert decode_batch(payload) == batch
        assert msgspec.msgpack.decode(payload) == frames[i]["decoded"]
    sub.close()


def test_sequence_starts_at_zero(publisher: ZmqEventPublisher, ctx: zmq.Context) -> None:
    for _ in range(3):
        publisher.publish([AllBlocksCleared()])
    replies = request_replay(ctx, publisher.bound_replay_port, 0)
    assert [r[2] for r in replies] == [i.to_bytes(8, "big") for i in range(3)] + [END_SEQ]


def test_replay_answers_like_vllm(publisher: ZmqEventPublisher, ctx: zmq.Context) -> None:
    vector = load_vector("vllm_kv_events_replay.json")
    for batch in vector_batches():
        publisher.publish(batch.events, ts=batch.ts)
    # Publishing happens before the request, and the I/O thread drains its queue before it
    # answers a request, so all five batches are in the buffer.
    replies = request_replay(ctx, publisher.bound_replay_port, vector["replay_request_start_seq"])
    expected = [[bytes.fromhex(f) for f in msg] for msg in vector["replay_reply_frames_hex"]]
    assert len(replies) == len(expected)
    for ours, theirs in zip(replies, expected, strict=True):
        assert len(ours) == len(theirs) == 4
        assert ours[:3] == theirs[:3]  # delimiter, topic, seq
        if theirs[3]:
            assert msgspec.msgpack.decode(ours[3]) == msgspec.msgpack.decode(theirs[3])
    assert replies[-1] == [b"", b"", END_SEQ, b""]
    assert int.from_bytes(END_SEQ, "big", signed=True) == -1


def test_replay_keeps_only_buffer_steps(ctx: zmq.Context) -> None:
    with ZmqEventPublisher(
        "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", buffer_steps=2, topic="w1"
    ) as pub:
        assert pub.bound_port and pub.bound_replay_port
        for _ in range(5):
            pub.publish([BlockRemoved(block_hashes=[1])])
        replies = request_replay(ctx, pub.bound_replay_port, 0)
        assert [r[1] for r in replies] == [b"w1"] * 3
        assert [r[2] for r in replies] == [(3).to_bytes(8, "big"), (4).to_bytes(8, "big"), END_SEQ]
        assert request_replay(ctx, pub.bound_replay_port, 9) == [[b"", b"w1", END_SEQ, b""]]


def test_publish_is_thread_safe_and_keeps_per_thread_order(
    publisher: ZmqEventPublisher, ctx: zmq.Context
) -> None:
    def worker(thread_idx: int) -> None:
        for i in range(50):
            publisher.publish([BlockRemoved(block_hashes=[thread_idx * 1000 + i])])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replies = request_replay(ctx, publisher.bound_replay_port, 0)[:-1]
    assert [int.from_bytes(r[2], "big") for r in replies] == list(range(200))
    hashes = [decode_batch(r[3]).events[0].block_hashes[0] for r in replies]  # type: ignore[union-attr]
    for t in range(4):
        mine = [h for h in hashes if h // 1000 == t]
        assert mine == [t * 1000 + i for i in range(50)]


def test_close_flushes_pending_batches(ctx: zmq.Context) -> None:
    pub = ZmqEventPublisher("tcp://127.0.0.1:*")
    sub = connect_sub(ctx, pub.bound_port)
    last_probe = sync_sub(pub, sub)
    for i in range(100):
        pub.publish([BlockRemoved(block_hashes=[i])])
    pub.close()
    seqs = []
    while len(seqs) < 100 and sub.poll(int(WAIT_S * 1000)):
        seqs.append(int.from_bytes(sub.recv_multipart()[1], "big"))
    assert seqs == list(range(last_probe + 1, last_probe + 101))
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish([])
    pub.close()  # idempotent
    sub.close()


def test_data_parallel_rank_is_stamped(ctx: zmq.Context) -> None:
    with ZmqEventPublisher(
        "tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", data_parallel_rank=None
    ) as pub:
        pub.publish([AllBlocksCleared()], ts=5.0)
        reply = request_replay(ctx, pub.bound_replay_port, 0)[0]
        assert decode_batch(reply[3]) == KVEventBatch(5.0, [AllBlocksCleared()], None)


def test_offset_endpoint_port_follows_vllm() -> None:
    assert offset_endpoint_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint_port("tcp://*:5557", 2) == "tcp://*:5559"
    assert offset_endpoint_port("tcp://127.0.0.1:*", 2) == "tcp://127.0.0.1:*"
    assert offset_endpoint_port("inproc://kv", 1) == "inproc://kv_dp1"
    assert offset_endpoint_port(None, 3) is None


def test_bad_endpoint_raises_with_context() -> None:
    with pytest.raises(RuntimeError, match="cannot use"):
        ZmqEventPublisher("tcp://*:notaport")


def test_null_publisher_drops_everything() -> None:
    pub = NullEventPublisher("tcp://*:5557", replay_endpoint="tcp://*:5558")
    pub.publish([AllBlocksCleared()])
    assert pub.bound_port is None and pub.bound_replay_port is None
    pub.close()
