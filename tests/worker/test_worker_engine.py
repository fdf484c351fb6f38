"""Worker behaviour that needs a real model: prefix caching, preemption, KV events, draining."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from serving.engine.config import EngineConfig
from serving.router.block_set import BlockSetTracker
from serving.router.subscriber import KVEventSubscriber
from serving.worker.config import WorkerConfig
from serving.worker.server import build_state
from tests.worker.conftest import (
    WorkerProcess,
    metric,
    scrape,
    serve_in_thread,
    start_worker_process,
)

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"

PARAGRAPH = (
    "The history of cartography spans thousands of years, from clay tablets in Babylon to "
    "satellite imagery. Early maps mixed observation with myth; medieval mappae mundi placed "
    "Jerusalem at the centre, while Portolan charts guided sailors across the Mediterranean "
    "with remarkable accuracy. "
)


def long_prefix_ids(smollm2_dir: Path, num_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    return ids[:num_tokens]


def test_prefix_cache_hit_on_shared_1000_token_prefix(
    smollm2_worker: WorkerProcess, smollm2_dir: Path
) -> None:
    client = openai.OpenAI(base_url=smollm2_worker.base_url, api_key="x", max_retries=0)
    prefix = long_prefix_ids(smollm2_dir, 1000)
    first_prompt = [*prefix, 19, 7, 8]
    second_prompt = [*prefix, 23, 42, 17, 99]
    first = client.completions.create(model=MODEL, prompt=first_prompt, max_tokens=2, temperature=0)
    before = scrape(smollm2_worker.url)
    second = client.completions.create(
        model=MODEL, prompt=second_prompt, max_tokens=2, temperature=0
    )
    after = scrape(smollm2_worker.url)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens == 1003
    assert cached >= 992, cached
    assert cached == 992  # 62 full blocks of 16: the whole shared prefix the blocks can hold
    hits = metric(after, "vllm:prefix_cache_hits_total") - metric(
        before, "vllm:prefix_cache_hits_total"
    )
    assert hits == cached
    # Only the uncached rest of the prompt was computed.
    computed = metric(after, "vllm:prompt_tokens_total") - metric(
        before, "vllm:prompt_tokens_total"
    )
    assert computed == len(second_prompt) - cached


def test_no_request_lost_under_preemption(smollm2_dir: Path, tmp_path: Path) -> None:
    """A pool far too small for 32 concurrent requests: all finish, each as when run alone."""
    worker = start_worker_process(
        ["--model", str(smollm2_dir), "--num-blocks", "40", "--log-level", "warning"],
        tmp_path / "worker.log",
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
        prompts = [
            tokenizer(f"Write a short note number {i} about the number {i * 7}:")["input_ids"]
            for i in range(32)
        ]

        async def run(concurrent: bool) -> list[list[int]]:
            async with openai.AsyncOpenAI(
                base_url=worker.base_url, api_key="x", max_retries=0, timeout=600
            ) as client:

                async def one(prompt: list[int]) -> list[int]:
                    response = await client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=24,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    return response.choices[0].model_extra["token_ids"]

                if concurrent:
                    return list(await asyncio.gather(*(one(p) for p in prompts)))
                return [await one(p) for p in prompts]

        alone = asyncio.run(run(concurrent=False))
        before = scrape(worker.url)
        together = asyncio.run(run(concurrent=True))
        after = scrape(worker.url)
    finally:
        worker.stop()
    preemptions = metric(after, "vllm:num_preemptions_total") - metric(
        before, "vllm:num_preemptions_total"
    )
    assert preemptions > 0, "the pool was meant to force preemption"
    assert all(len(t) == 24 for t in together)
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a != b]
    assert not mismatched, f"requests {mismatched} differ from their run alone"


def test_kv_events_rebuild_the_engines_block_set(smollm2_dir: Path) -> None:
    """Subscribe to a worker's KV events; after requests and evictions the rebuilt set of held
    blocks equals the engine's own cached blocks."""
    config = WorkerConfig(
        engine=EngineConfig(model_dir=smollm2_dir, num_blocks=24),
        kv_events_port=0,
        served_model_name=[MODEL],
    )
    server = serve_in_thread(build_state(config))
    health = server.state.extra_health
    subscriber = KVEventSubscriber(
        f"tcp://127.0.0.1:{health['kv_events_port']}",
        replay_endpoint=f"tcp://127.0.0.1:{health['kv_events_replay_port']}",
    )
    tracker = BlockSetTracker()
    num_removed = 0
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        prefix = long_prefix_ids(smollm2_dir, 120)
        for i in range(12):  # shared prefixes, then distinct ones that evict them
            prompt = [*prefix[: 40 + 8 * i], 100 + i] if i < 6 else [500 + i] * (90 + i)
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        pool = server.state.engine.core.kv_cache_manager.block_pool
        expected = pool.cached_block_hashes()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for _, batch in subscriber.poll(timeout_ms=100) or subscriber.catch_up():
                tracker.apply(batch.events)
                num_removed += sum(type(e).__name__ == "BlockRemoved" for e in batch.events)
            if tracker.held_hashes("GPU") == expected:
                break
        assert tracker.held_hashes("GPU") == expected
        assert num_removed > 0, "the workload was meant to evict blocks"
        assert len(expected) > 0
        assert subscriber.num_lost_batches == 0
    finally:
        subscriber.close()
        server.stop()


def test_sigterm_drains_in_flight_requests(smollm2_dir: Path, tmp_path: Path) -> None:
    worker = start_worker_process(
        ["--model", str(smollm2_dir), "--log-level", "info"], tmp_path / "worker.log"
    )

    async def scenario() -> tuple[str, int]:
        async with openai.AsyncOpenAI(
            base_url=worker.base_url, api_key="x", max_retries=0, timeout=120
        ) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Count to twenty."}],
                max_tokens=40,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            chunks = []
            async for chunk in stream:
                if not chunks:
                    worker.proc.send_signal(signal.SIGTERM)  # mid-stream
                chunks.append(chunk)
            finish = chunks[-1].choices[0].finish_reason
            num_tokens = sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks[1:])
            return finish, num_tokens

    try:
        finish, num_tokens = asyncio.run(scenario())
        assert finish == "length" and num_tokens == 40
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly.
        assert worker.proc.wait(60) in (0, -signal.SIGTERM)
        assert "draining: 1 requests in flight" in worker.log_path.read_text()
    finally:
        worker.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{worker.url}/health")
