"""Acceptance 4 of issue 15 (fallback form): vLLM prefill/decode roles behind the frontend.

vLLM 0.32's NixlConnector does not run on this CPU machine: a prefill worker started with it
(``strata serve --engine vllm --prefill 1 --decode 1``) hangs in its first ``execute_model``
until vLLM's 300 s RPC timeout kills its engine (docs/vllm.md, "Disaggregation", has the log).
What the frontend must do then, or whenever a prefill worker answers without
``kv_transfer_params``, is prefill on the decode worker: the client gets the same tokens, and
each such decision is counted (``local_prefill_failed``).

This test registers the session pool's two vLLM workers in a second frontend as a prefill and a
decode worker (no KV connector, so vLLM ignores the prefill request's ``kv_transfer_params`` and
answers without any), forces every prompt remote, and checks that outputs are token for token
those of one aggregated vLLM worker, that the prefill worker was asked every time, and that every
decision is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.engine.test_hf_equality import CHAT_PROMPTS, COMPLETION_PROMPTS
from tests.vllm.fixtures import (
    MODEL,
    POOL_TIMEOUT_S,
    VLLMPool,
    start_strata_serve,
    stop_strata_serve,
)
from tests.worker.conftest import labelled, metric, scrape

# The first test to use the session pool also pays for its start (minutes on two cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(POOL_TIMEOUT_S)]

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def disagg(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, vllm_pool: VLLMPool
) -> Iterator[dict]:
    decode, prefill = vllm_pool.workers
    proc, url = start_strata_serve(
        smollm2_dir, tmp_path_factory.mktemp("vllm-roles"),
        "--workers", "0", "--max-local-prefill-tokens", "0",
        "--worker-url", f"{prefill.url};role=prefill;id=prefill",
        "--worker-url", f"{decode.url};role=decode;id=decode",
    )  # fmt: skip
    try:
        yield {"url": url, "prefill": prefill.url, "decode": decode.url}
    finally:
        stop_strata_serve(proc)


def _requests() -> list[tuple[str, str, dict]]:
    out = [(name, "completions", {"prompt": text}) for name, text in COMPLETION_PROMPTS[:6]]
    out += [(name, "chat/completions", {"messages": m}) for name, m in CHAT_PROMPTS[:6]]
    return out


def _token_ids(base_url: str, endpoint: str, body: dict) -> list[int]:
    payload = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
               "return_token_ids": True, **body}  # fmt: skip
    response = httpx.post(f"{base_url}/v1/{endpoint}", json=payload, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_prefill_without_kv_params_falls_back_to_decode_worker(disagg: dict) -> None:
    requests = _requests()
    assert len(requests) >= 10
    prefill_before = scrape(disagg["prefill"])
    mismatches = []
    for name, endpoint, body in requests:
        expected = _token_ids(disagg["decode"], endpoint, body)  # one aggregated vLLM worker
        got = _token_ids(disagg["url"], endpoint, body)
        if got != expected:
            mismatches.append(f"{name}: aggregated {expected}, through P/D roles {got}")
    assert not mismatches, "\n".join(mismatches)
    frontend = scrape(disagg["url"])
    fallbacks = labelled(frontend, "strata_router_disagg_decisions_total",
                         decision="local_prefill_failed")  # fmt: skip
    assert fallbacks == len(requests)
    assert metric(frontend, "strata_router_disagg_decisions_total") == len(requests)
    asked = metric(scrape(disagg["prefill"]), "vllm:request_success_total") - metric(
        prefill_before, "vllm:request_success_total"
    )
    assert asked == len(requests)
