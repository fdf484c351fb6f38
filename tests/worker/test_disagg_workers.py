"""Prefill and decode worker processes speaking vLLM's kv_transfer_params (issue 5).

Acceptance 2 (the lease: freed after the pull, and after expiry when nobody pulls) and 3 (the
prefill worker killed between prefill and pull: the request completes with the same output),
over NIXL (``--kv-transport auto``; this machine has the wheels) and the TCP fallback. Plus the
mock engine's modelled transfer and the API's errors.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.router.disagg import prefill_request_params
from tests.worker.conftest import (
    WorkerProcess,
    labelled,
    metric,
    scrape,
    start_worker_process,
    wait_until,
)

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = (
    "In the mountains north of the old city, shepherds still move their flocks between summer "
    "and winter pastures, following routes their families have used for centuries. "
) * 3


def _worker(
    model_dir: Path, logs: Path, name: str, role: str, transport: str, *extra: str
) -> WorkerProcess:
    args = ["--model", str(model_dir), "--served-model-name", MODEL, "--num-blocks", "256",
            "--role", role, "--kv-transport", transport, *extra]  # fmt: skip
    return start_worker_process(args, logs / f"{name}.log")


@pytest.fixture(scope="module")
def nixl_pair(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("disagg-workers")
    prefill = _worker(smollm2_dir, logs, "prefill", "prefill", "auto")
    decode = _worker(smollm2_dir, logs, "decode", "decode", "auto")
    yield prefill, decode
    prefill.stop()
    decode.stop()


def completion(url: str, prompt: str, max_tokens: int = 16, **extra: object) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def prefill(url: str, prompt: str) -> dict:
    """vLLM's prefill request; returns the filled kv_transfer_params."""
    out = completion(url, prompt, max_tokens=1, kv_transfer_params=prefill_request_params())
    params = out["kv_transfer_params"]
    assert params is not None and params["do_remote_prefill"] is True
    return params


def leases(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/kv/leases").json()["leases"]


def test_prefill_response_carries_vllm_fields(nixl_pair: tuple[WorkerProcess, ...]) -> None:
    prefill_worker, _ = nixl_pair
    assert prefill_worker.health["role"] == "prefill"
    params = prefill(prefill_worker.url, "Name three rivers in Africa:")
    for key in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port"):
        assert params[key], key
    assert params["do_remote_decode"] is False and params["tp_size"] == 1
    assert isinstance(params["remote_block_ids"], list)
    assert isinstance(params["remote_block_ids"][0], list)  # one list per KV-cache group
    assert params["strata_transport"]["kind"] == prefill_worker.health["kv_transport"]["kind"]
    assert (
        httpx.delete(f"{prefill_worker.url}/v1/kv/leases/{params['remote_request_id']}").status_code
        == 204
    )


def test_lease_is_freed_after_the_pull(nixl_pair: tuple[WorkerProcess, ...]) -> None:
    prefill_worker, decode_worker = nixl_pair
    prompt = "A lease test: " + PROMPT
    expected = completion(prefill_worker.url, prompt)["choices"][0]["token_ids"]
    pulled_before = scrape(prefill_worker.url)
    params = prefill(prefill_worker.url, prompt)
    held = leases(prefill_worker.url)
    assert [lease["request_id"] for lease in held] == [params["remote_request_id"]]
    assert held[0]["block_ids"] == params["remote_block_ids"][0]
    assert held[0]["num_tokens"] == params["remote_num_tokens"]
    assert 0 < held[0]["expires_in_s"] <= 30

    out = completion(decode_worker.url, prompt, kv_transfer_params=params)
    assert out["choices"][0]["token_ids"] == expected
    wait_until(lambda: not leases(prefill_worker.url), "the lease to be released")
    after = scrape(prefill_worker.url)
    assert (
        labelled(after, "strata_kv_leases_released_total", how="pulled")
        == labelled(pulled_before, "strata_kv_leases_released_total", how="pulled") + 1
    )
    wait_until(
        lambda: metric(scrape(prefill_worker.url), "vllm:kv_cache_usage_perc") == 0,
        "the prefill worker's blocks to be free",
    )
    decode = scrape(decode_worker.url)
    assert labelled(decode, "strata_kv_pulls_total", outcome="ok") >= 1
    # A full pull of every block but the one holding only the last prompt token.
    num_blocks = len(params["remote_block_ids"][0])
    assert metric(decode, "strata_kv_transfer_bytes_total") >= (num_blocks - 1) * 737_280


def test_lease_expires_when_nobody_pulls(nixl_pair: tuple[WorkerProcess, ...]) -> None:
    prefill_worker, decode_worker = nixl_pair
    prompt = "An expiry test: " + PROMPT
    expected = completion(decode_worker.url, prompt, max_tokens=8)["choices"][0]["token_ids"]
    before = scrape(prefill_worker.url)
    params = prefill(prefill_worker.url, prompt)
    request_id = params["remote_request_id"]
    # Shorten this lease through the renewal API (the default is 30 s).
    renewed = httpx.post(
        f"{prefill_worker.url}/v1/kv/leases/{request_id}/renew", json={"lease_s": 0.3}
    )
    assert renewed.status_code == 200 and renewed.json()["expires_in_s"] <= 0.3
    wait_until(lambda: not leases(prefill_worker.url), "the lease to expire")
    after = scrape(prefill_worker.url)
    assert (
        labelled(after, "strata_kv_leases_released_total", how="expired")
        == labelled(before, "strata_kv_leases_released_total", how="expired") + 1
    )
    wait_until(
        lambda: metric(scrape(prefill_worker.url), "vllm:kv_cache_usage_perc") == 0,
        "the expired lease's blocks to be free",
    )
    for call in (httpx.post, httpx.delete):
        path = f"/v1/kv/leases/{request_id}" + ("/renew" if call is httpx.post else "")
        missing = call(f"{prefill_worker.url}{path}")
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "request_id"
    # A decode request arriving after the lease: the params' expiry stops the pull (the blocks
    # may be reused by now) and the decode worker prefills locally, with the same output.
    failed_before = labelled(scrape(decode_worker.url), "strata_kv_pulls_total", outcome="failed")
    stale = {**params, "remote_lease_expires_unix_s": time.time() - 1}
    out = completion(decode_worker.url, prompt, max_tokens=8, kv_transfer_params=stale)
    assert out["choices"][0]["token_ids"] == expected
    failed_after = labelled(scrape(decode_worker.url), "strata_kv_pulls_total", outcome="failed")
    assert failed_after == failed_before + 1


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_prefill_worker_killed_before_the_pull(
    transport: str,
    nixl_pair: tuple[WorkerProcess, ...],
    smollm2_dir: Path,
    tmp_path: Path,
) -> None:
    """A first request through the doomed worker makes the decode side connect (a cached peer);
    the second request's blocks are prefilled, then the prefill worker is SIGKILLed."""
    doomed = _worker(smollm2_dir, tmp_path, "doomed", "prefill", transport)
    decode_worker = (
        nixl_pair[1]
        if transport == "auto"
        else _worker(smollm2_dir, tmp_path, "decode-tcp", "decode", "tcp")
    )
    try:
        assert doomed.health["kv_transport"]["kind"] == (
            "tcp" if transport == "tcp" else nixl_pair[1].health["kv_transport"]["kind"]
        )
        warm = f"Warm-up ({transport}): " + PROMPT
        warm_expected = completion(doomed.url, warm)["choices"][0]["token_ids"]
        warm_params = prefill(doomed.url, warm)
        out = completion(decode_worker.url, warm, kv_transfer_params=warm_params)
        assert out["choices"][0]["token_ids"] == warm_expected

        prompt = f"After the crash ({transport}): " + PROMPT
        expected = completion(doomed.url, prompt)["choices"][0]["token_ids"]
        params = prefill(doomed.url, prompt)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(30)
        before = scrape(decode_worker.url)
        out = completion(decode_worker.url, prompt, kv_transfer_params=params)
        assert out["choices"][0]["token_ids"] == expected
        after = scrape(decode_worker.url)
        assert (
            labelled(after, "strata_kv_pulls_total", outcome="failed")
            == labelled(before, "strata_kv_pulls_total", outcome="failed") + 1
        )
        assert httpx.get(f"{decode_worker.url}/health").status_code == 200
    finally:
        if doomed.proc.poll() is None:
            doomed.stop()
        if decode_worker is not nixl_pair[1]:
            decode_worker.stop()


def test_malformed_kv_transfer_params_are_a_400(nixl_pair: tuple[WorkerProcess, ...]) -> None:
    _, decode_worker = nixl_pair
    bad = {"do_remote_prefill": True, "remote_block_ids": [["x"]], "remote_engine_id": "e",
           "remote_request_id": "r"}  # fmt: skip
    response = httpx.post(
        f"{decode_worker.url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "kv_transfer_params": bad},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "kv_transfer_params" and "remote_block_ids" in error["message"]
    renew = httpx.post(f"{decode_worker.url}/v1/kv/leases/x/renew", json={"lease_s": -1})
    assert renew.status_code == 400 and renew.json()["error"]["param"] == "lease_s"


def test_mock_workers_model_the_transfer_time(tmp_path: Path) -> None:
    """Mock engines move a stand-in pool over the real transport and add the modelled time:
    pulled bytes are exactly tokens * kv_bytes_per_token (131,072: Llama-3-8B in bf16)."""
    common = ["--engine", "mock", "--vocab-size", "32000", "--served-model-name", MODEL,
              "--kv-transport", "tcp", "--mock-kv-bandwidth-gbps", "1"]  # fmt: skip
    prefill_worker = start_worker_process([*common, "--role", "prefill"], tmp_path / "p.log")
    decode_worker = start_worker_process([*common, "--role", "decode"], tmp_path / "d.log")
    try:
        prompt_ids = list(range(100, 100 + 161))  # 161 tokens: 160 pulled, the last recomputed
        body = {"model": MODEL, "prompt": prompt_ids, "max_tokens": 1,
                "kv_transfer_params": prefill_request_params()}  # fmt: skip
        params = httpx.post(f"{prefill_worker.url}/v1/completions", json=body).json()[
            "kv_transfer_params"
        ]
        assert len(params["remote_block_ids"][0]) == 11
        body = {"model": MODEL, "prompt": prompt_ids, "max_tokens": 4, "kv_transfer_params": params}
        out = httpx.post(f"{decode_worker.url}/v1/completions", json=body).json()
        assert out["usage"]["completion_tokens"] == 4
        values = scrape(decode_worker.url)
        assert metric(values, "strata_kv_transfer_bytes_total") == 160 * 131_072
        # 21 MB at 1 GB/s: at least 21 ms in the transfer histogram.
        assert metric(values, "strata_kv_transfer_seconds_sum") >= 160 * 131_072 / 1e9
        wait_until(lambda: not leases(prefill_worker.url), "the mock lease to be released")
    finally:
        prefill_worker.stop()
        decode_worker.stop()
