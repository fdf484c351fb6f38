"""Acceptance: a real Prometheus scrapes a real ``strata serve`` stack (frontend + 2 mock workers)
under load; then every dashboard query and every rule expression is evaluated through
Prometheus' HTTP API. Each must be valid, and each dashboard query must return data, except
queries on metrics of components this stack does not run (planned metrics) and on what only a
disaggregated stack records (``test_prometheus_disagg.py`` checks those): those are skipped by
dashboard, panel and query name (``pytest -rs`` lists them)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rich.console import Console

from grafana.panels import parse_label_values
from tests.observability.conftest import (
    DashboardQuery,
    dashboard_queries,
    load_dashboards,
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
    start_serve,
    stop,
    wait_for_scrapes_and_rules,
    wait_until_up,
)
from tests.worker.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)]

MODEL = "smollm2-135m-instruct"
NUM_REQUESTS = 40
# Long enough to span the whole load: every rate() window sees it.
RATE_INTERVAL = "2m"
_NOT_RUNNING: dict[str, str] = {}  # planned metric prefix -> why this stack lacks it
# Series an aggregated stack never creates (histograms whose first sample creates them).
_DISAGG_ONLY = {
    "strata_frontend_remote_prefill_seconds": "only a disaggregated stack prefills on a prefill "
    "worker (test_prometheus_disagg.py checks this panel with data)",
    "strata_frontend_key_": "only a frontend with rate-limited keys (a keys file) has per-key "
    "series (tests/frontend/test_admission.py checks them)",
}


@pytest.fixture(scope="module")
def stack(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    # The planner runs in the stack (its dashboard's panels need data), holding 2 replicas.
    planner = _planner_config(tmp)
    # A host-memory KV tier on each worker: the KV cache tiers row has data.
    # Admission limits far above the load: the 'vs limit' panels need a limit to draw.
    serve, frontend_url = start_serve(smollm2_dir, tmp, "--workers", "2", "--planner-config",
                                      str(planner), "--kv-host-gib", "0.25",
                                      "--max-inflight-requests", "256",
                                      "--max-queued-prompt-tokens", "1000000")  # fmt: skip
    prometheus = None
    try:
        workers = httpx.get(f"{frontend_url}/admin/workers", timeout=10).json()["workers"]
        worker_urls = [w["url"] for w in workers]
        assert len(worker_urls) == 2
        workflow_url = _run_workflows_and_serve_their_metrics()
        hosts = {"frontend": [frontend_url], "worker": worker_urls, "workflow": [workflow_url]}
        hosts = {name: [u.removeprefix("http://") for u in urls] for name, urls in hosts.items()}
        prometheus, prometheus_url = start_prometheus(tmp, hosts)
        result = Stack(prometheus_url, frontend_url, worker_urls)
        wait_until_up(result, 4)
        drive_load(frontend_url, MODEL, NUM_REQUESTS)
        wait_for_scrapes_and_rules(result, after_s=time.time())
        yield result
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(serve)


def _planner_config(tmp: Path) -> Path:
    from tests.planner.conftest import formula_profile

    formula_profile().save(tmp / "profile.json")
    config = {
        "model": MODEL,
        "profile": "profile.json",
        "roles": {"both": {"min_replicas": 2, "max_replicas": 2}},
        "predictor": {"kind": "moving_average"},
        "scaling": {"interval_s": 1, "model_interval_s": 1},
        "metrics": {"window_s": 5},
    }
    path = tmp / "planner.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_workflows_and_serve_their_metrics() -> str:
    """Run the local workflow runner twice (one success, one failed stage) with stand-in steps,
    and serve its registry the way the demo's frontend does, for the lifecycle panels."""
    from prometheus_client import start_http_server

    from workflows.local_runner import run_workflow
    from workflows.metrics import STAGE_BYTES, WORKFLOW_REGISTRY
    from workflows.pipeline import PublishParams, StepSpec, WorkflowSpec

    def stage(params: PublishParams) -> dict[str, Any]:
        STAGE_BYTES.labels(model=params.name).inc(541_600_000)
        return {"staged_dir": "/model-cache/x"}

    def failing_stage(params: PublishParams) -> dict[str, Any]:
        raise OSError("S3 unreachable")

    def verify(params: PublishParams, staged_dir: str) -> dict[str, Any]:
        return {}

    params = PublishParams(name=MODEL)
    wiring = {"staged_dir": ("stage", "staged_dir")}
    ok = WorkflowSpec("publish-model", (
        StepSpec("stage", stage),
        StepSpec("verify", verify, depends=("stage",), inputs=wiring),
    ))  # fmt: skip
    bad = WorkflowSpec("publish-model", (StepSpec("stage", failing_stage),))
    quiet = Console(file=io.StringIO())
    run_workflow(ok, params, console=quiet)
    run_workflow(bad, params, console=quiet, raise_on_failure=False)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=WORKFLOW_REGISTRY)
    return f"127.0.0.1:{port}"


def _not_running_reason(expr: str) -> str | None:
    for name in sorted(metric_names(expr)):
        planned = planned_metric(name)
        if planned is not None:
            reason = next(r for p, r in _NOT_RUNNING.items() if planned.startswith(p))
            return f"{planned}: {reason}"
        base = next((b for b in _DISAGG_ONLY if name.startswith(b)), None)
        if base is not None:
            return f"{base}: {_DISAGG_ONLY[base]}"
    return None


QUERIES = dashboard_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_dashboard_query_returns_data(stack: Stack, query: DashboardQuery) -> None:
    expr = substitute(query.expr, MODEL, rate_interval=RATE_INTERVAL, time_range="10m")
    result = stack.query(expr)  # valid, whether or not its component runs
    reason = _not_running_reason(query.expr)
    if reason is not None:
        pytest.skip(f"skipped panel {query.name}: {reason}")
    assert result, f"{query.name}: no data for {expr}"


@pytest.mark.parametrize("dashboard", load_dashboards(), ids=lambda d: d["uid"])
def test_model_variable_lists_the_model(stack: Stack, dashboard: dict) -> None:
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    metric, label = parse_label_values(variable["query"]["query"])
    response = httpx.get(f"{stack.prometheus_url}/api/v1/label/{label}/values",
                         params={"match[]": metric}, timeout=10).json()  # fmt: skip
    assert response["status"] == "success"
    reason = _not_running_reason(metric)
    if reason is not None:
        pytest.skip(f"skipped variable {dashboard['title']} / model: {reason}")
    assert MODEL in response["data"]


RULES = load_rules()


@pytest.mark.parametrize("rule", RULES, ids=[r.get("record") or r["alert"] for r in RULES])
def test_rule_expression_is_valid(stack: Stack, rule: dict) -> None:
    result = stack.query(rule["expr"])
    if "record" not in rule:
        return  # an alert's expression is empty while all is well
    reason = _not_running_reason(rule["expr"])
    if reason is not None:
        pytest.skip(f"skipped rule {rule['record']}: {reason}")
    assert result, f"recording rule {rule['record']}: no data for {rule['expr']}"


def test_prometheus_evaluates_every_rule_without_error(stack: Stack) -> None:
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert loaded == {r.get("record") or r["alert"] for r in RULES}
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
                 if r["health"] != "ok"]  # fmt: skip
    assert unhealthy == []


def test_both_workers_and_the_frontend_were_scraped(stack: Stack) -> None:
    up = stack.query('count by (component) (up{job="strata"} == 1)')
    by_component = {s["metric"]["component"]: s["value"][1] for s in up}
    assert by_component == {"frontend": "1", "worker": "2", "workflow": "1"}
    served = stack.query(
        f'count(sum by (instance) (vllm:request_success_total{{model_name="{MODEL}"}}) > 0)'
    )
    assert served and served[0]["value"][1] == "2", "both workers served requests"
