"""Acceptance 3 of issue 15: one Strata worker and one vLLM worker behind one KV router.

A frontend (in this process, as ``strata serve --workers 0`` builds it) over a Strata builtin
worker (block size 32) and a vLLM worker of the session pool, both registered by URL only: the
Strata worker's KV endpoints come from its ``/health``, the vLLM worker's from its
``/kv_event_sources``, the router's block size from both (``pool_block_size``, as ``strata
serve`` does). A prefix cached on one worker (sent to it directly) is routed back to it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.vllm_engine.discovery import pool_block_size
from tests.frontend.conftest import start_frontend
from tests.vllm.fixtures import MODEL, POOL_TIMEOUT_S, VLLMPool, vllm_python_or_skip
from tests.worker.conftest import WorkerProcess, metric, scrape, start_worker_process, wait_until

# The first test to use the session pool also pays for its start (minutes on two cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(POOL_TIMEOUT_S)]

BLOCK_SIZE = 32


@pytest.fixture(scope="module")
def strata_worker(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    vllm_python_or_skip()  # no point starting it without the vLLM half
    logs = tmp_path_factory.mktemp("mixed")
    args = ["--model", str(smollm2_dir), "--kv-events-port", "0", "--served-model-name", MODEL,
            "--block-size", str(BLOCK_SIZE), "--num-blocks", "256"]  # fmt: skip
    worker = start_worker_process(args, logs / "strata-worker.log")
    yield worker
    worker.stop()


def _complete(url: str, prompt: list[int]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_workers_prefixes_are_routed_back_to_it(
    smollm2_dir: Path, vllm_pool: VLLMPool, strata_worker: WorkerProcess
) -> None:
    vllm_url = vllm_pool.workers[0].url
    block_size = pool_block_size([strata_worker.url, vllm_url], 16)
    assert block_size == BLOCK_SIZE  # from both workers: /health and vllm:cache_config_info
    server = start_frontend(
        smollm2_dir, [f"{strata_worker.url};id=strata", f"{vllm_url};id=vllm"],
        router="kv", block_size=block_size,
    )  # fmt: skip
    frontend = server.url
    try:
        listed = httpx.get(f"{frontend}/admin/workers", timeout=10).json()["workers"]
        assert {w["worker_id"]: bool(w["kv_events_endpoint"]) for w in listed} == {
            "strata": True,
            "vllm": True,
        }
        rng = random.Random(33)
        homes = {"strata": strata_worker.url, "vllm": vllm_url}
        prefixes = {}
        for worker_id, url in homes.items():  # cache a 4-block prefix on each, directly
            prefixes[worker_id] = [rng.randrange(1000, 40000) for _ in range(4 * BLOCK_SIZE)]
            _complete(url, prefixes[worker_id] + [rng.randrange(1000, 40000)])

        def indexed() -> bool:
            return metric(scrape(frontend), "strata_router_indexed_blocks") >= 8

        wait_until(indexed, "both workers' blocks in the router's index", timeout_s=60)
        for _ in range(2):
            for worker_id, prefix in prefixes.items():
                before = {w: scrape(u) for w, u in homes.items()}
                suffix = [rng.randrange(1000, 40000) for _ in range(9)]
                usage = _complete(frontend, prefix + suffix)["usage"]
                served = {
                    w: metric(scrape(u), "vllm:request_success_total")
                    - metric(before[w], "vllm:request_success_total")
                    for w, u in homes.items()
                }
                assert served[worker_id] == 1, f"{worker_id}'s prefix went elsewhere: {served}"
                assert usage["prompt_tokens_details"]["cached_tokens"] == 4 * BLOCK_SIZE
    finally:
        server.stop()
