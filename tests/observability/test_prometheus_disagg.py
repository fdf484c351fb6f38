"""Acceptance for disaggregated serving's observability: a real Prometheus scrapes
``strata serve --prefill 1 --decode 1`` (mock engine, every prompt prefilled remotely) under
load. Every query of the dashboards' disaggregation rows returns data; the counters say every
request was prefilled on the prefill worker and its KV pulled by the decode worker; the workers
table, the fallback stat and ``StrataKVTransportFallback`` agree on the KV transport the workers
chose (NIXL where it works, else TCP: then fallback="true")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.observability.conftest import DashboardQuery, dashboard_queries, load_rules, substitute
from tests.observability.prometheus_stack import (
    NO_PROMETHEUS,
    PROMETHEUS,
    Stack,
    drive_load,
    start_prometheus,
    start_serve,
    stop,
    wait_for_scrapes_and_rules,
    wait_until_up,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)]

MODEL = "smollm2-135m-instruct"
NUM_REQUESTS = 16
RATE_INTERVAL = "2m"
M = f'model="{MODEL}"'
MN = f'model_name="{MODEL}"'


@pytest.fixture(scope="module")
def stack(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability-disagg")
    serve, frontend_url = start_serve(
        smollm2_dir, tmp, "--prefill", "1", "--decode", "1", "--max-local-prefill-tokens", "0"
    )
    prometheus = None
    try:
        workers = httpx.get(f"{frontend_url}/admin/workers", timeout=10).json()["workers"]
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        worker_urls = [w["url"] for w in workers]
        hosts = {"frontend": [frontend_url], "worker": worker_urls}
        hosts = {name: [u.removeprefix("http://") for u in urls] for name, urls in hosts.items()}
        prometheus, prometheus_url = start_prometheus(tmp, hosts)
        result = Stack(prometheus_url, frontend_url, worker_urls)
        wait_until_up(result, 3)
        drive_load(frontend_url, MODEL, NUM_REQUESTS)
        wait_for_scrapes_and_rules(result, after_s=time.time())
        yield result
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(serve)


QUERIES = [q for q in dashboard_queries() if q.row.startswith("Disaggregation")]


def test_the_disaggregation_rows_have_queries() -> None:
    assert {q.dashboard for q in QUERIES} == {"Strata / Router", "Strata / Workers and KV cache"}


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_disaggregation_query_returns_data(stack: Stack, query: DashboardQuery) -> None:
    expr = substitute(query.expr, MODEL, rate_interval=RATE_INTERVAL, time_range="10m")
    assert stack.query(expr), f"{query.name}: no data for {expr}"


def test_every_request_was_prefilled_remotely_and_pulled(stack: Stack) -> None:
    decisions = {
        s["metric"]["decision"]: float(s["value"][1])
        for s in stack.query(f"strata_router_disagg_decisions_total{{{M}}}")
    }
    assert decisions == {"remote": NUM_REQUESTS, "local_short": 0, "local_no_prefill_worker": 0,
                         "local_prefill_failed": 0, "aggregated": 0}  # fmt: skip
    assert stack.value(f"strata_frontend_remote_prefill_seconds_count{{{M}}}") == NUM_REQUESTS
    pulls = {
        s["metric"]["outcome"]: float(s["value"][1])
        for s in stack.query(f"sum by (outcome) (strata_kv_pulls_total{{{MN}}})")
    }
    assert pulls == {"ok": NUM_REQUESTS, "failed": 0}
    assert stack.value(f"sum(strata_kv_transfer_seconds_count{{{MN}}})") == NUM_REQUESTS
    assert stack.value(f'sum(strata_kv_transfer_bytes_total{{{MN}, direction="receive"}})') > 0
    leases = {
        s["metric"]["how"]: float(s["value"][1])
        for s in stack.query(f"sum by (how) (strata_kv_leases_released_total{{{MN}}})")
    }
    assert leases == {"pulled": NUM_REQUESTS, "released": 0, "expired": 0}
    assert stack.value(f"sum(strata_kv_leases{{{MN}}})") == 0


def test_workers_table_fallback_stat_and_alert_agree(stack: Stack) -> None:
    """``--kv-transport auto``: NIXL where it works; TCP, flagged as a fallback, where not."""
    (table,) = [q for q in QUERIES if q.panel == "Workers by role and KV transport"]
    rows = [s["metric"] for s in stack.query(substitute(table.expr, MODEL))]
    assert sorted(r["role"] for r in rows) == ["decode", "prefill"]
    for row in rows:
        assert row["transport"] in ("nixl", "tcp")
        assert row["fallback"] == ("true" if row["transport"] == "tcp" else "false")
    on_tcp = sorted(r["instance"] for r in rows if r["transport"] == "tcp")
    (stat,) = [q for q in QUERIES if q.panel == "Workers on TCP fallback"]
    assert stack.value(substitute(stat.expr, MODEL)) == len(on_tcp)
    (alert,) = [r for r in load_rules() if r.get("alert") == "StrataKVTransportFallback"]
    assert sorted(s["metric"]["instance"] for s in stack.query(alert["expr"])) == on_tcp
