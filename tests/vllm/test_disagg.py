"""Acceptance 4 of issue 15: vLLM prefill and decode workers behind Strata's frontend.

``strata serve --engine vllm --prefill 1 --decode 1`` starts a vLLM prefill worker
(``NixlConnector``, ``kv_role="kv_producer"``, CPU buffers) and a decode worker
(``kv_consumer``); with ``--max-local-prefill-tokens 0`` every prompt is prefilled remotely: the
frontend sends vLLM's prefill request (``max_tokens=1``, ``do_remote_decode``) and passes the
answer's ``kv_transfer_params`` verbatim to the decode worker, which pulls the blocks over NIXL.
Ten prompts answer token for token as one aggregated vLLM worker does (the session's
reference answers), every decision is counted ``remote`` and every prompt's KV crosses NIXL.

The fallback: when a prefill worker answers without ``kv_transfer_params`` (no KV connector,
as the session pool's workers registered under P/D roles here), the decode worker prefills
itself; the client gets the same tokens and each decision counts as ``local_prefill_failed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.engine.test_hf_equality import CHAT_PROMPTS, COMPLETION_PROMPTS
from tests.frontend.conftest import start_frontend
from tests.vllm.fixtures import (
    POOL_TIMEOUT_S,
    VLLM_TEST_ARGS,
    ReferenceAnswers,
    VLLMPool,
    start_strata_serve,
    stop_strata_serve,
    token_ids,
)
from tests.worker.conftest import labelled, metric, scrape

# The first test to use the session pool also pays for its start (minutes on two cores); the
# P/D pair's start (two more vLLM workers) is charged to its test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(POOL_TIMEOUT_S)]

RecordProperty = Callable[[str, object], None]


def _requests() -> list[tuple[str, str, dict]]:
    """Ten prompts (the acceptance's minimum): five completions, five chats."""
    out = [(name, "completions", {"prompt": text}) for name, text in COMPLETION_PROMPTS[:5]]
    out += [(name, "chat/completions", {"messages": m}) for name, m in CHAT_PROMPTS[:5]]
    return out


def _mismatches(url: str, requests: list, reference: ReferenceAnswers) -> list[str]:
    out = []
    for name, endpoint, body in requests:
        expected = reference.token_ids(endpoint, body)
        got = token_ids(url, endpoint, body)
        if got != expected:
            out.append(f"{name}: aggregated vLLM {expected}, through P/D {got}")
    return out


@pytest.fixture(scope="module")
def vllm_pd(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, vllm_pool: VLLMPool
) -> Iterator[dict[str, str]]:
    """``strata serve --engine vllm --prefill 1 --decode 1``, every prompt remote."""
    worker_args = [f"--worker-arg={arg}" for arg in VLLM_TEST_ARGS]
    tmp = tmp_path_factory.mktemp("vllm-pd")
    proc, url = start_strata_serve(
        smollm2_dir, tmp, "--engine", "vllm",
        "--prefill", "1", "--decode", "1", "--router", "kv", "--max-local-prefill-tokens", "0",
        *worker_args,
    )  # fmt: skip
    try:
        listed = httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]
        roles = {w["role"]: w["url"] for w in listed}
        yield {"url": url, "prefill": roles["prefill"], "decode": roles["decode"],
               "log": str(tmp / "serve.log")}  # fmt: skip
    finally:
        stop_strata_serve(proc)


def test_vllm_prefill_and_decode_workers_match_one_aggregated_worker(
    vllm_pd: dict[str, str], vllm_reference: ReferenceAnswers, record_property: RecordProperty
) -> None:
    requests = _requests()
    before = {role: scrape(vllm_pd[role]) for role in ("prefill", "decode")}
    mismatches = _mismatches(vllm_pd["url"], requests, vllm_reference)
    assert not mismatches, "\n".join(mismatches)
    frontend = scrape(vllm_pd["url"])
    after = {role: scrape(vllm_pd[role]) for role in ("prefill", "decode")}

    def grew(role: str, name: str) -> float:
        return metric(after[role], name) - metric(before[role], name)

    remote = labelled(frontend, "strata_router_disagg_decisions_total", decision="remote")
    transfers = grew("decode", "vllm:nixl_xfer_time_seconds_count")
    record_property("requests", len(requests))
    record_property("remote_decisions", remote)
    record_property("nixl_transfers", transfers)
    record_property("nixl_xfer_time_s", round(grew("decode", "vllm:nixl_xfer_time_seconds_sum"), 3))
    record_property("nixl_bytes", grew("decode", "vllm:nixl_bytes_transferred_sum"))
    record_property("nixl_failed_transfers", grew("decode", "vllm:nixl_num_failed_transfers_total"))
    record_property(
        "remote_prefill_s", round(metric(frontend, "strata_frontend_remote_prefill_seconds_sum"), 1)
    )
    assert remote == metric(frontend, "strata_router_disagg_decisions_total") == len(requests)
    # A stream that failed over (a migration) would reach the prefill worker as a whole request.
    migrations = metric(frontend, "strata_frontend_migrations_total")
    assert migrations == 0, f"{migrations} streams migrated; see {vllm_pd['log']}"
    assert grew("prefill", "vllm:request_success_total") == len(requests)  # the prefill requests
    assert grew("decode", "vllm:request_success_total") == len(requests)
    assert transfers == len(requests)  # every prompt's KV pulled over NIXL
    assert grew("decode", "vllm:nixl_num_failed_transfers_total") == 0


@pytest.fixture(scope="module")
def roles_without_connector(smollm2_dir: Path, vllm_pool: VLLMPool) -> Iterator[dict[str, str]]:
    """The session pool's workers (no KV connector) as a prefill and a decode worker, in a
    frontend in this process."""
    decode, prefill = vllm_pool.workers
    frontend = start_frontend(
        smollm2_dir,
        [f"{prefill.url};role=prefill;id=prefill", f"{decode.url};role=decode;id=decode"],
        block_size=32,
        max_local_prefill_tokens=0,  # every prompt is prefilled remotely
    )
    try:
        yield {"url": frontend.url, "prefill": prefill.url, "decode": decode.url}
    finally:
        frontend.stop()


def test_prefill_without_kv_params_falls_back_to_decode_worker(
    roles_without_connector: dict[str, str],
    vllm_reference: ReferenceAnswers,
    record_property: RecordProperty,
) -> None:
    pd = roles_without_connector
    requests = _requests()[::3]  # four of the ten (their reference answers are shared)
    prefill_before = scrape(pd["prefill"])
    mismatches = _mismatches(pd["url"], requests, vllm_reference)
    assert not mismatches, "\n".join(mismatches)
    frontend = scrape(pd["url"])
    fallbacks = labelled(frontend, "strata_router_disagg_decisions_total",
                         decision="local_prefill_failed")  # fmt: skip
    record_property("requests", len(requests))
    record_property("local_prefill_failed", fallbacks)
    assert fallbacks == metric(frontend, "strata_router_disagg_decisions_total") == len(requests)
    asked = metric(scrape(pd["prefill"]), "vllm:request_success_total") - metric(
        prefill_before, "vllm:request_success_total"
    )
    assert asked == len(requests)
