"""Acceptance 5 of issue 15: the Serving and Workers dashboards on a vLLM pool.

A real Prometheus (1 s scrape and rule interval, our rule file) scrapes the session's
``strata serve --engine vllm`` frontend and its two stock vLLM workers (their own ``/metrics``:
vLLM 0.32's names, labels and histogram buckets) under a short load; every query of every panel
of the Serving and Workers dashboards must return data, except the panels of components a vLLM
pool does not run, skipped by name with the reason (``pytest -rs`` lists them), and every rule
expression must evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.observability.conftest import (
    DashboardQuery,
    dashboard_queries,
    load_rules,
    metric_names,
    planned_metric,
    substitute,
)
from tests.observability.prometheus_stack import (
    NO_PROMETHEUS,
    PROMETHEUS,
    Stack,
    drive_load,
    start_prometheus,
    stop,
    wait_for_scrapes_and_rules,
    wait_until_up,
)
from tests.vllm.fixtures import MODEL, POOL_TIMEOUT_S, VLLMPool

# The first test to use the session pool also pays for its start (minutes on two cores).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(POOL_TIMEOUT_S),
    pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS),
]

RATE_INTERVAL = "2m"
DASHBOARDS = ("Strata / Serving", "Strata / Workers and KV cache")
# Strata's own worker series that a stock vLLM worker does not have (vLLM's NIXL connector
# reports its transfers in its own vllm:nixl_* series, on P/D workers only).
_STRATA_WORKER_ONLY = {
    "strata_worker_info": "Strata workers' role/transport info; vLLM exposes no such series",
    "strata_kv_pulls_total": "Strata's KV transport; vLLM's NIXL transfers are vllm:nixl_*",
    "strata_kv_transfer_seconds": "Strata's KV transport; vLLM's NIXL transfers are vllm:nixl_*",
    "strata_kv_transfer_bytes_total": "Strata's KV transport; vLLM's are vllm:nixl_*",
    "strata_kv_leases": "Strata's prefill leases; vLLM's NIXL connector keeps its own",
    "strata_kv_tier_": "Strata's KV tiers (G2-G4, docs/kv-tiers.md); a stock vLLM worker has "
    "no such series",
    # The frontend's, not the engine's: as in tests/observability/test_prometheus_integration.py.
    "strata_frontend_key_": "only a frontend with rate-limited keys (a keys file) has per-key "
    "series (tests/frontend/test_admission.py checks them)",
}


@pytest.fixture(scope="module")
def stack(vllm_pool: VLLMPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("vllm-prometheus")
    hosts = {
        "frontend": [vllm_pool.url.removeprefix("http://")],
        "worker": [w.url.removeprefix("http://") for w in vllm_pool.workers],
    }
    prometheus, prometheus_url = start_prometheus(tmp, hosts)
    try:
        result = Stack(prometheus_url, vllm_pool.url, [w.url for w in vllm_pool.workers])
        wait_until_up(result, 3)
        drive_load(vllm_pool.url, MODEL, 12)
        # One refused request of the served model (longer than its context): the
        # errors-by-status panel has a series.
        bad = {"model": MODEL, "prompt": list(range(1000, 3000)), "max_tokens": 2}
        refused = httpx.post(f"{vllm_pool.url}/v1/completions", json=bad, timeout=60)
        assert refused.status_code == 400, refused.text
        wait_for_scrapes_and_rules(result, after_s=time.time())
        yield result
    finally:
        stop(prometheus)


def _skip_reason(expr: str) -> str | None:
    for name in sorted(metric_names(expr)):
        planned = planned_metric(name)
        if planned is not None:
            return f"{planned}: planned (no component emits it yet)"
        base = next((b for b in _STRATA_WORKER_ONLY if name.startswith(b)), None)
        if base is not None:
            return f"{base}: {_STRATA_WORKER_ONLY[base]}"
    return None


QUERIES = [q for q in dashboard_queries() if q.dashboard in DASHBOARDS]


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_panel_returns_data_on_a_vllm_pool(stack: Stack, query: DashboardQuery) -> None:
    expr = substitute(query.expr, MODEL, rate_interval=RATE_INTERVAL, time_range="10m")
    result = stack.query(expr)
    reason = _skip_reason(query.expr)
    if reason is not None:
        pytest.skip(f"skipped panel {query.name}: {reason}")
    assert result, f"{query.name}: no data for {expr}"


def test_rules_evaluate_on_vllm_metrics(stack: Stack) -> None:
    for rule in load_rules():
        stack.query(rule["expr"])  # raises with Prometheus' error on an invalid expression
    usage = stack.query(f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}}')
    assert len(usage) == 2  # StrataKVCacheNearlyFull watches both vLLM workers


def test_both_vllm_workers_served_and_were_scraped(stack: Stack) -> None:
    served = stack.query(
        f'count(sum by (instance) (vllm:request_success_total{{model_name="{MODEL}"}}) > 0)'
    )
    assert served and served[0]["value"][1] == "2"
