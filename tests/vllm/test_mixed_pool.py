"""Acceptance 3 of issue 15: one Strata worker and one vLLM worker behind one KV router.

``strata serve --workers 0`` over a Strata builtin worker (block size 32) and a vLLM worker of
the session pool, both registered by URL only: the Strata worker's KV endpoints come from its
``/health``, the vLLM worker's from its ``/kv_event_sources``, the router's block size from both.
A prefix cached on one worker (sent to it directly) is routed back to that worker.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.vllm.fixtures import (
    MODEL,
    POOL_TIMEOUT_S,
    VLLMPool,
    start_strata_serve,
    stop_strata_serve,
    vllm_python_or_skip,
)
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
    smollm2_dir: Path,
    tmp_path: Path,
    vllm_pool: VLLMPool,
    strata_worker: WorkerProcess,
) -> None:
    vllm_url = vllm_pool.workers[0].url
    proc, frontend = start_strata_serve(
        smollm2_dir, tmp_path, "--workers", "0", "--router", "kv",
        "--worker-url", f"{strata_worker.url};id=strata", "--worker-url", f"{vllm_url};id=vllm",
    )  # fmt: skip
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
        stop_strata_serve(proc)
