"""Acceptance 1 and 2 of issue 15 on the session's ``strata serve --engine vllm --workers 2
--router kv`` pool (``tests/vllm/fixtures.py``):

1. the chat test set answers token for token as vLLM alone does (greedy), the openai client
   works, and the streams of a SIGKILLed vLLM worker migrate to the other one and complete;
2. after a random workload that evicts blocks from vLLM's small KV cache, the router's index of
   each worker equals the block set rebuilt from that worker's own KV events, and prefixes it
   holds are routed back to it: ``cached_tokens`` equals the router's prediction and the growth
   of that worker's ``vllm:prefix_cache_hits_total``.

The SIGKILL test is marked ``kills_vllm_worker`` and runs last in the session (conftest): it
kills worker 1, which the pool then restarts (``vllm_worker``, worker 0, stays up).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable, Sequence

import httpx
import openai
import pytest

from serving.protocol.block_hash import hash_token_blocks
from serving.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from tests.engine.test_hf_equality import CHAT_PROMPTS
from tests.vllm.fixtures import (
    MODEL,
    NUM_GPU_BLOCKS,
    POOL_TIMEOUT_S,
    KVEventCapture,
    ReferenceAnswers,
    VLLMPool,
    VLLMWorker,
    token_ids,
)
from tests.worker.conftest import metric, scrape, wait_until

# The first test to use the session pool also pays for its start (minutes on two cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(POOL_TIMEOUT_S)]

BLOCK_SIZE = 32
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Long enough that the streams are still running when the test sees them and kills the worker.
# (vLLM streams ~100 tokens/s per stream here: 96 tokens were over in about a second.)
MIGRATION_MAX_TOKENS = 400
RecordProperty = Callable[[str, object], None]


def test_chat_set_is_token_identical_to_vllm_alone(
    vllm_pool: VLLMPool, vllm_reference: ReferenceAnswers, record_property: RecordProperty
) -> None:
    mismatches = []
    for name, messages in CHAT_PROMPTS:
        body = {"messages": messages}
        expected = vllm_reference.token_ids("chat/completions", body)
        got = token_ids(vllm_pool.url, "chat/completions", body)
        if got != expected:
            mismatches.append(f"{name}: vLLM alone {expected}, through Strata {got}")
    record_property("chat_prompts", len(CHAT_PROMPTS))
    record_property("chat_mismatches", len(mismatches))
    assert not mismatches, "\n".join(mismatches)


def test_openai_client_through_the_frontend(vllm_pool: VLLMPool) -> None:
    client = openai.OpenAI(base_url=vllm_pool.base_url, api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0,
                                          max_tokens=30)  # fmt: skip
    assert chat.choices[0].message.content == "The capital of France is Paris."
    assert chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    # The repeat is routed to the worker that holds the prompt; vLLM reports its cached tokens.
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 32 * 32
    completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                           temperature=0, max_tokens=8)  # fmt: skip
    assert completion.choices[0].text.startswith(" Paris")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=FRANCE)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"


# -- acceptance 2: the router's index against vLLM's own events and metrics ----------------------


def reference_router_blocks(payloads: Sequence[bytes], block_size: int) -> set[int]:
    """The router hashes of the blocks vLLM holds on the GPU medium, rebuilt from its events
    independently of the indexer: every stored block's tokens are kept (even after removal),
    a held block's prefix is walked through its parents, hashed by the reference hasher."""
    seen: dict[int | bytes, tuple[int | bytes | None, list[int]]] = {}
    held: set[int | bytes] = set()
    for payload in payloads:
        for event in decode_batch(payload).events:
            if isinstance(event, BlockStored) and event.medium in (None, "GPU"):
                parent = event.parent_block_hash
                for i, engine_hash in enumerate(event.block_hashes):
                    tokens = event.token_ids[i * block_size : (i + 1) * block_size]
                    seen[engine_hash] = (parent, tokens)
                    held.add(engine_hash)
                    parent = engine_hash
            elif isinstance(event, BlockRemoved) and event.medium in (None, "GPU"):
                held.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                held.clear()
    out = set()
    for engine_hash in held:
        chain: list[list[int]] = []
        current: int | bytes | None = engine_hash
        while current is not None:
            parent, tokens = seen[current]
            chain.append(tokens)
            current = parent
        prefix = [t for tokens in reversed(chain) for t in tokens]
        out.add(hash_token_blocks(prefix, block_size)[-1])
    return out


def _router_blocks(frontend_url: str, worker_id: str) -> set[int]:
    body = httpx.get(f"{frontend_url}/admin/workers/{worker_id}/kv_blocks", timeout=10).json()
    assert body["block_size"] == BLOCK_SIZE
    return set(body["blocks"].get("GPU", []))


def _applied_batches(frontend_url: str, worker_id: str) -> int:
    listed = httpx.get(f"{frontend_url}/admin/workers", timeout=10).json()["workers"]
    return next(w["num_event_batches"] for w in listed if w["worker_id"] == worker_id)


def _all_frames(worker: VLLMWorker) -> list[tuple[bytes, bytes, bytes]]:
    assert worker.replay_endpoint is not None
    capture = KVEventCapture(worker.replay_endpoint)
    try:
        return capture.take()
    finally:
        capture.close()


def _complete(frontend_url: str, prompt: list[int]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{frontend_url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_router_index_equals_vllms_blocks_after_evictions(
    vllm_pool: VLLMPool, record_property: RecordProperty
) -> None:
    rng = random.Random(15)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 8) * BLOCK_SIZE)]
                for _ in range(4)]  # fmt: skip
    # 20 requests of 4-7 shared and 2-8 unique blocks (~120 blocks) into 2 x 40: evictions on
    # both. Each prefix goes to one worker directly: the index is built from the events whoever
    # sends the requests, and through the router a fresh pool could send every new prefix to the
    # same idle worker, leaving the other without events (seen running this file alone).
    for _ in range(20):
        which = rng.randrange(len(prefixes))
        suffix = [rng.randrange(1000, 40000) for _ in range(rng.randrange(64, 256))]
        worker = vllm_pool.workers[which % len(vllm_pool.workers)]
        _complete(worker.url, prefixes[which] + suffix)

    references: dict[str, set[int]] = {}
    num_removed = 0
    for worker in vllm_pool.workers:
        frames = _all_frames(worker)
        last_seq = int.from_bytes(frames[-1][1], "big")
        wait_until(lambda w=worker, n=last_seq + 1: _applied_batches(vllm_pool.url, w.worker_id)
                   >= n, f"{worker.worker_id}'s KV events applied", timeout_s=60)  # fmt: skip
        events = [e for f in frames for e in decode_batch(f[2]).events]
        num_removed += sum(len(e.block_hashes) for e in events if isinstance(e, BlockRemoved))
        references[worker.worker_id] = reference_router_blocks([f[2] for f in frames], BLOCK_SIZE)
        assert 0 < len(references[worker.worker_id]) <= NUM_GPU_BLOCKS
        assert _router_blocks(vllm_pool.url, worker.worker_id) == references[worker.worker_id]
        record_property(f"{worker.worker_id}_event_batches", last_seq + 1)
        record_property(f"{worker.worker_id}_indexed_blocks", len(references[worker.worker_id]))

    record_property("removed_blocks", num_removed)
    assert num_removed > 0, "the workload evicted nothing"

    # Prefixes a worker holds are routed back to it; what the router predicted is what vLLM hit.
    probed = 0
    for prefix in prefixes:
        hashes = hash_token_blocks(prefix, BLOCK_SIZE)
        holders = {w: len(_leading(hashes, blocks)) for w, blocks in references.items()}
        worker_id, num_blocks = max(holders.items(), key=lambda item: item[1])
        if num_blocks == 0:
            continue
        worker = next(w for w in vllm_pool.workers if w.worker_id == worker_id)
        before = {w.worker_id: scrape(w.url) for w in vllm_pool.workers}
        prompt = prefix + [rng.randrange(1000, 40000) for _ in range(5)]
        usage = _complete(vllm_pool.url, prompt)["usage"]
        after = scrape(worker.url)
        hits = metric(after, "vllm:prefix_cache_hits_total") - metric(
            before[worker_id], "vllm:prefix_cache_hits_total"
        )
        served = metric(after, "vllm:request_success_total") - metric(
            before[worker_id], "vllm:request_success_total"
        )
        assert served == 1, f"prefix of {num_blocks} blocks on {worker_id} was routed elsewhere"
        assert usage["prompt_tokens_details"]["cached_tokens"] == num_blocks * BLOCK_SIZE == hits
        record_property(f"probe_{probed}", f"{worker_id}: predicted {num_blocks * BLOCK_SIZE}, "
                        f"reported {usage['prompt_tokens_details']['cached_tokens']}, vLLM hits "
                        f"{hits:.0f} tokens")  # fmt: skip
        probed += 1
        references = {w.worker_id: reference_router_blocks(
            [f[2] for f in _all_frames(w)], BLOCK_SIZE) for w in vllm_pool.workers}  # fmt: skip
    assert probed >= 2


def _leading(hashes: list[int], held: set[int]) -> list[int]:
    out = []
    for block_hash in hashes:
        if block_hash not in held:
            break
        out.append(block_hash)
    return out


# -- last: a vLLM worker SIGKILLed mid-stream ---------------------------------------------


@pytest.mark.kills_vllm_worker
def test_sigkilled_vllm_worker_streams_migrate_and_complete(
    vllm_pool: VLLMPool, record_property: RecordProperty
) -> None:
    victim = vllm_pool.workers[1]
    listed = httpx.get(f"{vllm_pool.url}/admin/workers", timeout=10).json()["workers"]
    states = {w["worker_id"]: (w["healthy"], w["draining"]) for w in listed}
    assert states.get(victim.worker_id) == (True, False), f"pool before the kill: {states}"
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 300}, one number a line."}]
               for i in range(4)]  # fmt: skip
    expected = []
    for messages in prompts:  # vLLM alone; it also caches the prompts on the victim
        body = {"model": MODEL, "messages": messages, "temperature": 0,
                "max_tokens": MIGRATION_MAX_TOKENS}  # fmt: skip
        answer = httpx.post(f"{victim.url}/v1/chat/completions", json=body, timeout=600)
        expected.append(answer.json()["choices"][0]["message"]["content"])
    client = openai.OpenAI(base_url=vllm_pool.base_url, api_key="x", max_retries=0)
    texts: list[list[str]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=prompts[i],
                temperature=0,
                max_tokens=MIGRATION_MAX_TOKENS,
                stream=True,
            )
            for chunk in chunks:
                if chunk.choices:
                    texts[i].append(chunk.choices[0].delta.content or "")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    frontend = vllm_pool.url

    def victim_streaming() -> bool:
        if not any(thread.is_alive() for thread in threads):  # too late to kill mid-stream
            raise AssertionError(f"every stream ended before the victim was seen streaming: "
                                 f"{[len(t) for t in texts]} chunks, errors {errors}")  # fmt: skip
        listed = httpx.get(f"{frontend}/admin/workers", timeout=10).json()["workers"]
        active = next(w["active_requests"] for w in listed if w["worker_id"] == victim.worker_id)
        # Kill as soon as the victim streams anything: the frontend relays a worker's tokens
        # a network read at a time, so a whole answer can come in 2-3 chunks (seen in a full
        # run) and a wait for several chunks per stream can outlast every stream.
        return active >= 1

    wait_until(victim_streaming, "streams running on the victim", timeout_s=300)
    os.killpg(victim.pid(), signal.SIGKILL)  # the API server and its engine core, like a pod
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    assert ["".join(t) for t in texts] == expected
    migrations = metric(scrape(frontend), "strata_frontend_migrations_total")
    record_property("streams", len(prompts))
    record_property("stream_chunks", [len(t) for t in texts])
    record_property("migrations", migrations)
    assert migrations >= 1
