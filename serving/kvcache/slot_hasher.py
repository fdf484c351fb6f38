"""Checksums of host-tier slots in helper processes (standard library and xxhash only).

The onboard loop of a GPU worker holds the GIL while it queues copies; checksum threads in the
same process took the GIL back after every block and slowed it several times over, so they could
only start once the loop had ended. Helper processes share no GIL with it: they map the host
tier's slots (``multiprocessing.shared_memory``) and hash them while the loop queues the copies.

Each helper is ``python -m serving.kvcache.slot_hasher SEGMENT SLOT_BYTES`` (not
``multiprocessing``'s spawn, which imports the parent's ``__main__``, torch and all, in every
helper) and speaks over its pipes: a request is a little-endian u32 count and that many u32
slot indices; the answer is the count again and a 16-byte XXH3-128 digest per slot, in order.
Importing this module must stay cheap: every helper imports it.
"""

from __future__ import annotations

import collections
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing import resource_tracker, shared_memory
from typing import BinaryIO

import xxhash

_COUNT = struct.Struct("<I")
DIGEST_BYTES = 16


def _read_exactly(stream: BinaryIO, num_bytes: int) -> bytes | None:
    data = stream.read(num_bytes)
    if len(data) < num_bytes:
        return None  # the other side is gone
    return data


def _serve(shm_name: str, slot_bytes: int) -> None:
    """A helper's loop: answer requests on stdin until it closes. Ctrl-C in a terminal reaches
    the whole process group; a helper leaves on the end of its input, when its worker closes
    the tier or dies, not on the signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    segment = shared_memory.SharedMemory(name=shm_name)
    # Attaching registers the segment with a resource tracker that would unlink it when this
    # helper exits (CPython gh-82300); the parent owns it.
    resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    buf = segment.buf
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (head := _read_exactly(stdin, _COUNT.size)) is not None:
        (count,) = _COUNT.unpack(head)
        body = _read_exactly(stdin, 4 * count)
        if body is None:
            break
        slots = struct.unpack(f"<{count}I", body)
        starts = [slot * slot_bytes for slot in slots]
        digests = [xxhash.xxh3_128_digest(buf[start : start + slot_bytes]) for start in starts]
        stdout.write(head + b"".join(digests))
        stdout.flush()


class _Helper:
    """One helper process, its requests in order, and the thread that reads its answers."""

    def __init__(self, shm_name: str, slot_bytes: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.kvcache.slot_hasher", shm_name, str(slot_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self._lock = threading.Lock()
        self._pending: collections.deque[Future[list[bytes]]] = collections.deque()
        self._exited = False  # set by the reader once the helper's answers end
        self._reader = threading.Thread(target=self._read_answers, daemon=True)
        self._reader.start()

    def submit(self, slots: Sequence[int]) -> Future[list[bytes]]:
        future: Future[list[bytes]] = Future()
        request = _COUNT.pack(len(slots)) + struct.pack(f"<{len(slots)}I", *slots)
        stdin = self.process.stdin
        assert stdin is not None
        with self._lock:
            if self._exited:
                future.set_exception(RuntimeError("checksum helper exited"))
                return future
            self._pending.append(future)
            try:
                stdin.write(request)
                stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                self._pending.remove(future)
                future.set_exception(RuntimeError(f"checksum helper is gone: {exc}"))
        return future

    def _read_answers(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        while (head := _read_exactly(stdout, _COUNT.size)) is not None:
            (count,) = _COUNT.unpack(head)
            body = _read_exactly(stdout, DIGEST_BYTES * count)
            if body is None:
                break
            with self._lock:
                future = self._pending.popleft()
            future.set_result(
                [body[i : i + DIGEST_BYTES] for i in range(0, len(body), DIGEST_BYTES)]
            )
        with self._lock:  # the helper ended: nothing pending or later will be answered
            self._exited = True
            while self._pending:
                self._pending.popleft().set_exception(RuntimeError("checksum helper exited"))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)


class SlotHasher:
    """``num_processes`` helpers hashing ``slot_bytes``-sized slots of the shared segment
    ``shm_name``; ``submit`` splits a list of slots into one chunk per helper."""

    def __init__(self, shm_name: str, slot_bytes: int, num_processes: int) -> None:
        if num_processes < 1:
            raise ValueError(f"a slot hasher needs at least one process, got {num_processes}")
        self.slot_bytes = slot_bytes
        self._helpers = [_Helper(shm_name, slot_bytes) for _ in range(num_processes)]
        for ready in [helper.submit([]) for helper in self._helpers]:
            ready.result(timeout=60)  # every helper has started and mapped the segment

    def submit(self, slots: Sequence[int]) -> list[tuple[list[int], Future[list[bytes]]]]:
        """Start hashing ``slots``: each chunk of slots with the future of its digests."""
        chunk = max(1, -(-len(slots) // len(self._helpers)))
        out = []
        for helper, start in zip(self._helpers, range(0, len(slots), chunk), strict=False):
            part = list(slots[start : start + chunk])
            out.append((part, helper.submit(part)))
        return out

    def close(self) -> None:
        for helper in self._helpers:
            helper.close()


class DigestsInFlight:
    """The digests of one onboard's host-tier blocks, being computed by the helpers."""

    def __init__(
        self, chunks: list[tuple[list[int], Future[list[bytes]]]], hash_of_slot: dict[int, int]
    ) -> None:
        self._chunks = chunks
        self._hash_of_slot = hash_of_slot

    def result(self) -> dict[int, bytes]:
        """Block hash -> XXH3-128 of its slot; raises if a helper failed."""
        digests: dict[int, bytes] = {}
        for slots, future in self._chunks:
            for slot, digest in zip(slots, future.result(timeout=60), strict=True):
                digests[self._hash_of_slot[slot]] = digest
        return digests


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
