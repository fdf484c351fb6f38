"""Acceptance 4 of issue 15: vLLM prefill/decode disaggregation behind Strata's frontend.

``strata serve --engine vllm --prefill 1 --decode 1 --max-local-prefill-tokens 0`` starts two
stock vLLM servers with the NixlConnector (CPU buffers, UCX): every request is prefilled on the
prefill worker (``max_tokens=1`` with vLLM's ``kv_transfer_params``), and the decode worker
pulls the prompt's KV blocks over NIXL and decodes. The outputs must be token for token those
of one aggregated vLLM worker (the session pool's), and every decision counted as remote.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.engine.test_hf_equality import CHAT_PROMPTS, COMPLETION_PROMPTS
from tests.vllm.fixtures import (
    MODEL,
    VLLM_TEST_ARGS,
    VLLMPool,
    start_strata_serve,
    stop_strata_serve,
    vllm_python_or_skip,
)
from tests.worker.conftest import labelled, metric, scrape

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def disagg(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    vllm_python_or_skip()
    tmp = tmp_path_factory.mktemp("vllm-disagg")
    proc, url = start_strata_serve(
        smollm2_dir, tmp, "--engine", "vllm", "--workers", "0", "--prefill", "1", "--decode", "1",
        "--max-local-prefill-tokens", "0", *[f"--worker-arg={a}" for a in VLLM_TEST_ARGS],
    )  # fmt: skip
    try:
        listed = httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]
        yield {"url": url, **{w["role"]: w["url"] for w in listed}}
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


def test_vllm_prefill_decode_equals_one_aggregated_vllm_worker(
    disagg: dict, vllm_pool: VLLMPool
) -> None:
    requests = _requests()
    assert len(requests) >= 10
    aggregated = vllm_pool.workers[0].url
    prefill_before, decode_before = scrape(disagg["prefill"]), scrape(disagg["decode"])
    mismatches = []
    for name, endpoint, body in requests:
        expected = _token_ids(aggregated, endpoint, body)
        got = _token_ids(disagg["url"], endpoint, body)
        if got != expected:
            mismatches.append(f"{name}: aggregated {expected}, disaggregated {got}")
    assert not mismatches, "\n".join(mismatches)
    frontend = scrape(disagg["url"])
    decisions = labelled(frontend, "strata_router_disagg_decisions_total", decision="remote")
    assert decisions == len(requests)
    prefilled = metric(scrape(disagg["prefill"]), "vllm:request_success_total") - metric(
        prefill_before, "vllm:request_success_total"
    )
    assert prefilled == len(requests)
    # The decode worker computed almost none of the prompts: their blocks came over NIXL.
    decode_after = scrape(disagg["decode"])
    pulled = labelled(decode_after, "vllm:prompt_tokens_by_source_total", source="kv_transfer")
    pulled -= labelled(decode_before, "vllm:prompt_tokens_by_source_total", source="kv_transfer")
    assert pulled > 0
