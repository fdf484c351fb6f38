"""Disaggregated serving end to end (issue 5, acceptance 1): ``strata serve --prefill 1
--decode 1`` on SmolLM2 (CPU, greedy) gives token-for-token the output of one aggregated worker.

The serve runs with ``--max-local-prefill-tokens 0`` so every request takes the remote path:
the frontend sends vLLM's prefill request to the prefill worker, the decode worker pulls the
blocks over NIXL (TCP where NIXL is missing, which the worker reports) and decodes. Prompts
are the engine equality set (14 raw texts, 10 chats; the long ones span 20-30 blocks) plus
repeats and shared-prefix variants, which hit the decode worker's prefix cache (it then pulls
only the blocks it lacks).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.engine.tokenizer import encode_prompt
from serving.netutil import free_port, wait_healthy
from tests.engine.test_hf_equality import CHAT_PROMPTS, COMPLETION_PROMPTS
from tests.frontend.conftest import start_frontend
from tests.worker.conftest import (
    WorkerProcess,
    labelled,
    metric,
    scrape,
    start_worker_process,
    wait_until,
)

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 24


@dataclass
class Serve:
    url: str
    proc: subprocess.Popen
    workers: dict[str, dict]  # role -> /admin/workers entry


@pytest.fixture(scope="module")
def disagg_serve(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    logs = tmp_path_factory.mktemp("disagg-serve")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--model", str(smollm2_dir),
         "--prefill", "1", "--decode", "1", "--max-local-prefill-tokens", "0",
         "--port", str(port), "--served-model-name", MODEL, "--log-level", "warning",
         "--worker-arg=--num-blocks=512"],
        stdout=(logs / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=180)
        listed = httpx.get(f"{url}/admin/workers").json()["workers"]
        yield Serve(url, proc, {w["role"]: w for w in listed})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def aggregated_worker(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    logs = tmp_path_factory.mktemp("aggregated")
    args = ["--model", str(smollm2_dir), "--served-model-name", MODEL, "--num-blocks", "512"]
    worker = start_worker_process(args, logs / "worker.log")
    yield worker
    worker.stop()


def _requests() -> list[tuple[str, str, dict]]:
    """(name, endpoint, body): 24 distinct prompts, then 4 that reuse cached prefixes."""
    out: list[tuple[str, str, dict]] = []
    for name, text in COMPLETION_PROMPTS:
        out.append((name, "completions", {"prompt": text}))
    for name, messages in CHAT_PROMPTS:
        out.append((name, "chat/completions", {"messages": messages}))
    texts = dict(COMPLETION_PROMPTS)
    out += [
        ("repeat-long-english", "completions", {"prompt": texts["long-english"]}),
        ("repeat-long-code", "completions", {"prompt": texts["long-code"]}),
        ("extend-long-english", "completions", {"prompt": texts["long-english"] + " In short,"}),
        ("extend-long-french", "completions", {"prompt": texts["long-french"] + " Bref :"}),
    ]
    return out


def _token_ids(base_url: str, endpoint: str, body: dict) -> tuple[list[int], dict]:
    payload = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, **body}
    response = httpx.post(f"{base_url}/v1/{endpoint}", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["choices"][0]["token_ids"], data["usage"]


def test_disaggregated_output_equals_one_aggregated_worker(
    disagg_serve: Serve, aggregated_worker: WorkerProcess
) -> None:
    requests = _requests()
    assert len(requests) >= 20
    decode_url = disagg_serve.workers["decode"]["url"]
    prefill_url = disagg_serve.workers["prefill"]["url"]
    before = scrape(decode_url)
    mismatches, cached = [], {}
    for name, endpoint, body in requests:
        expected, _ = _token_ids(aggregated_worker.url, endpoint, body)
        got, usage = _token_ids(disagg_serve.url, endpoint, body)
        cached[name] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        if got != expected:
            mismatches.append(f"{name}: expected {expected}, got {got}")
    assert not mismatches, "\n".join(mismatches)

    frontend = scrape(disagg_serve.url)
    assert labelled(frontend, "strata_router_disagg_decisions_total", decision="remote") == len(
        requests
    )
    after = scrape(decode_url)
    pulls = labelled(after, "strata_kv_pulls_total", outcome="ok") - labelled(
        before, "strata_kv_pulls_total", outcome="ok"
    )
    assert pulls == len(requests)
    assert labelled(after, "strata_kv_pulls_total", outcome="failed") == 0
    assert metric(after, "strata_kv_transfer_bytes_total") > 0
    # Repeats and extensions found their prefix in the decode worker's own cache.
    assert cached["repeat-long-english"] >= 320 and cached["extend-long-english"] >= 320
    assert cached["repeat-long-code"] > 0 and cached["extend-long-french"] > 0
    # Every lease was released by the decode worker's notification, none by expiry.
    _wait_for_no_leases(prefill_url)
    prefill = scrape(prefill_url)
    assert labelled(prefill, "strata_kv_leases_released_total", how="pulled") == len(requests)
    assert labelled(prefill, "strata_kv_leases_released_total", how="expired") == 0


def test_conditional_disaggregation_with_the_default_rule(
    smollm2_dir: Path, disagg_serve: Serve, aggregated_worker: WorkerProcess
) -> None:
    """Default rule (2,048 tokens / 70%): a fresh prompt goes remote; the same prompt again is
    mostly cached on the decode worker, so it is prefilled there. Same workers, a frontend
    with default settings."""
    workers = disagg_serve.workers
    frontend = start_frontend(
        smollm2_dir, [workers["prefill"]["url"], workers["decode"]["url"]], router="kv"
    )
    try:
        # A long prompt neither worker has seen: the sentences of the English passage reversed.
        sentences = dict(COMPLETION_PROMPTS)["long-english"].split(". ")
        prompt = ". ".join(reversed(sentences))
        expected, _ = _token_ids(aggregated_worker.url, "completions", {"prompt": prompt})
        first, _ = _token_ids(frontend.url, "completions", {"prompt": prompt})
        # The decode worker's BlockStored events reach the router asynchronously.
        indexer = frontend.router().indexer
        decode_id = next(w for w, v in frontend.pool().workers.items() if v.role == "decode")
        hashes = indexer.hash_request(encode_prompt(frontend.tokenizer(), prompt))
        wait_until(
            lambda: indexer.find_matches(hashes).num_blocks(decode_id) >= len(hashes) - 1,
            "the decode worker's blocks of the first request in the router's index",
        )
        second, usage = _token_ids(frontend.url, "completions", {"prompt": prompt})
        assert first == expected and second == expected
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 320
        values = scrape(frontend.url)
        assert labelled(values, "strata_router_disagg_decisions_total", decision="remote") == 1
        assert labelled(values, "strata_router_disagg_decisions_total", decision="local_short") == 1
    finally:
        frontend.stop()


def _wait_for_no_leases(prefill_url: str) -> None:
    """Release notifications are polled by the prefill engine thread: wait with a deadline."""
    wait_until(
        lambda: not httpx.get(f"{prefill_url}/v1/kv/leases").json()["leases"],
        "every lease to be released",
    )
