"""Strata's KV-event decoder, subscriber and index against frames from vLLM's own publisher
(a vLLM worker of the session pool, driven directly; ``tests/vllm/fixtures.py``)."""

from __future__ import annotations

import random

import httpx
import pytest

from serving.protocol.kv_events import BlockStored, decode_batch
from serving.router.indexer import KVIndexer
from serving.router.subscriber import KVEventSubscriber
from tests.vllm.fixtures import MODEL, POOL_TIMEOUT_S, KVEventCapture, VLLMWorker

# The first test to use the session pool also pays for its start (minutes on two cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(POOL_TIMEOUT_S)]

BLOCK_SIZE = 32


def _complete(worker: VLLMWorker, prompt: list[int], **extra: object) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
    response = httpx.post(f"{worker.url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_real_frames_decode_strictly(
    vllm_worker: VLLMWorker, vllm_kv_capture: KVEventCapture
) -> None:
    """Every key vLLM 0.32 sends decodes; stored tokens are the prompt's full blocks."""
    prompt = [random.Random(1).randrange(1000, 40000) for _ in range(3 * BLOCK_SIZE + 7)]
    _complete(vllm_worker, prompt)
    frames = vllm_kv_capture.wait_for(1)
    assert frames and all(topic == b"" for topic, _, _ in frames)
    stored = []
    for _, _, payload in frames:
        batch = decode_batch(payload)  # the strict decoder: no event skipped
        assert batch.data_parallel_rank == 0
        stored += [e for e in batch.events if isinstance(e, BlockStored)]
    first = stored[0]
    assert first.parent_block_hash is None and first.block_size == BLOCK_SIZE
    assert first.medium == "GPU" and first.lora_name is None and first.group_idx == 0
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in first.block_hashes)
    assert first.token_ids == prompt[: 3 * BLOCK_SIZE]


def test_cache_salt_blocks_match_only_salted_requests(
    vllm_worker: VLLMWorker, vllm_kv_capture: KVEventCapture
) -> None:
    """vLLM puts ``cache_salt`` in the first block's extra keys and in its block hashes; the
    index salts the chain the same way, so what it predicts is what vLLM finds."""
    prompt = [random.Random(2).randrange(1000, 40000) for _ in range(2 * BLOCK_SIZE + 3)]
    _complete(vllm_worker, prompt, cache_salt="tenant-a")
    indexer = KVIndexer(BLOCK_SIZE)
    for _, _, payload in vllm_kv_capture.wait_for(1):
        indexer.apply_batch("w", decode_batch(payload))
    salted = indexer.find_matches(indexer.hash_request(prompt, cache_salt="tenant-a"))
    plain = indexer.find_matches(indexer.hash_request(prompt))
    assert (salted.num_blocks("w"), plain.num_blocks("w")) == (2, 0)
    assert indexer.num_rejected_events == 0
    # vLLM agrees: the unsalted prompt misses, the salted repeat hits both blocks.
    plain_usage = _complete(vllm_worker, prompt)["usage"]
    salted_usage = _complete(vllm_worker, prompt, cache_salt="tenant-a")["usage"]
    assert plain_usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert salted_usage["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK_SIZE


def test_subscriber_fills_a_gap_from_vllms_replay_socket(
    vllm_worker: VLLMWorker, vllm_kv_capture: KVEventCapture
) -> None:
    """A subscriber that missed batches (it expects older ones than the next live batch) gets
    them from vLLM's replay socket first, then the live ones, each once and in order."""
    assert vllm_worker.replay_endpoint is not None
    rng = random.Random(3)
    for _ in range(2):
        _complete(vllm_worker, [rng.randrange(1000, 40000) for _ in range(2 * BLOCK_SIZE)])
    missed = vllm_kv_capture.wait_for(2)
    first_missed = int.from_bytes(missed[0][1], "big")
    subscriber = KVEventSubscriber(vllm_worker.kv_events_endpoint, vllm_worker.replay_endpoint,
                                   start_seq=first_missed)  # fmt: skip
    try:
        live: list = []
        for _ in range(10):  # the SUB joins late: publish until a live batch arrives
            _complete(vllm_worker, [rng.randrange(1000, 40000) for _ in range(2 * BLOCK_SIZE)])
            live = subscriber.poll(timeout_ms=3000)
            if live:
                break
        payloads = {int.from_bytes(seq, "big"): p for _, seq, p in missed + vllm_kv_capture.take()}
        seqs = [seq for seq, _ in live]
        assert seqs == list(range(first_missed, first_missed + len(live))) and len(live) > 2
        assert [batch for _, batch in live] == [decode_batch(payloads[seq]) for seq in seqs]
        assert subscriber.num_lost_batches == 0
    finally:
        subscriber.close()
