"""Acceptance: a real Prometheus scrapes a real ``strata serve`` stack (frontend + 2 mock workers)
under load; then every dashboard query and every rule expression is evaluated through
Prometheus' HTTP API. Each must be valid, and each dashboard query must return data, except
queries on metrics of components this stack does not run (planned metrics): those are skipped
by dashboard, panel and query name (``pytest -rs`` lists them)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from rich.console import Console

from grafana.panels import parse_label_values
from tests.observability.conftest import (
    REPO_ROOT,
    RULES_FILE,
    DashboardQuery,
    dashboard_queries,
    load_dashboards,
    load_rules,
    metric_names,
    planned_metric,
    substitute,
)
from tests.worker.conftest import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not on PATH: apt-get install prometheus (.ci/run installs it in CI)",
    ),
]

MODEL = "smollm2-135m-instruct"
NUM_REQUESTS = 40
DEADLINE_S = 90.0
# Long enough to span the whole load: every rate() window sees it.
RATE_INTERVAL = "2m"
_NOT_RUNNING = {
    "strata_planner_": "the planner does not exist yet",
    "strata_kv_tier_": "KV tiers below the device do not exist yet",
    "strata_kv_transfer_": "KV transfer does not exist yet",
}


@dataclass
class Stack:
    prometheus_url: str
    frontend_url: str
    worker_urls: list[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises with Prometheus' own error text on an invalid expression."""
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr},
                             timeout=10)  # fmt: skip
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('error')}")
        return body["data"]["result"]


def _wait_until(what: str, condition: Any, deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` (returns truthy when done) until ``deadline_s``; no fixed sleeps."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError, ValueError, IndexError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {deadline_s:.0f} s (last error: {last_error})")


def _start_serve(model_dir: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "serve", "--model", str(model_dir),
         "--workers", "2", "--engine", "mock", "--port", str(port),
         "--worker-arg=--speedup=20", "--log-level", "warning"],
        cwd=tmp,  # worker logs go to tmp/.strata/logs
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"strata serve exited:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        return httpx.get(f"{url}/health", timeout=2).status_code == 200

    _wait_or_stop(proc, "strata serve healthy", healthy, deadline_s=180)
    return proc, url


def _start_prometheus(tmp: Path, targets: dict[str, list[str]]) -> tuple[subprocess.Popen, str]:
    """Prometheus with a 1 s scrape and rule interval, file service discovery and our rules."""
    (tmp / "targets").mkdir()
    groups = [{"targets": hosts, "labels": {"component": name}} for name, hosts in targets.items()]
    (tmp / "targets" / "strata.json").write_text(json.dumps(groups))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {"job_name": "strata", "file_sd_configs": [{"files": [str(tmp / "targets/*.json")]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=(tmp / "prometheus.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait_or_stop(
        proc, "Prometheus ready", lambda: httpx.get(f"{url}/-/ready", timeout=2).is_success
    )
    return proc, url


def _wait_or_stop(
    proc: subprocess.Popen, what: str, condition: Any, deadline_s: float = DEADLINE_S
) -> None:
    """``_wait_until``; on failure, stop the process that did not come up."""
    try:
        _wait_until(what, condition, deadline_s)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (``strata serve`` then stops its workers), SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _drive_load(frontend_url: str) -> None:
    """Chat and completions, streamed and not, sharing a prefix (prefix-cache hits), from 8
    threads (both workers get traffic), plus one request for an unknown model (404)."""
    client = openai.OpenAI(base_url=f"{frontend_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    system = "You are a helpful assistant for the Strata observability test. " * 4

    def one(i: int) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Q{i}"}]
        if i % 2:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=12,
                stream=True,
            )
            assert sum(1 for _ in stream) > 0
        else:
            out = client.completions.create(model=MODEL, prompt=system + str(i), max_tokens=12)
            assert out.usage is not None and out.usage.completion_tokens == 12

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(NUM_REQUESTS)))


@pytest.fixture(scope="module")
def stack(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    serve, frontend_url = _start_serve(smollm2_dir, tmp)
    prometheus = None
    try:
        workers = httpx.get(f"{frontend_url}/admin/workers", timeout=10).json()["workers"]
        worker_urls = [w["url"] for w in workers]
        assert len(worker_urls) == 2
        workflow_url = _run_workflows_and_serve_their_metrics()
        hosts = {"frontend": [frontend_url], "worker": worker_urls, "workflow": [workflow_url]}
        hosts = {name: [u.removeprefix("http://") for u in urls] for name, urls in hosts.items()}
        prometheus, prometheus_url = _start_prometheus(tmp, hosts)
        result = Stack(prometheus_url, frontend_url, worker_urls)
        _wait_until("4 targets up", lambda: _num_up(result) == 4)
        _drive_load(frontend_url)
        load_end_s = time.time()
        # Two scrapes of every target after the load, then one rule evaluation after those.
        _wait_until("scrapes after the load",
                    lambda: _oldest_scrape_s(result) > load_end_s + 2.0)  # fmt: skip
        _wait_until("rules evaluated", lambda: _oldest_rule_evaluation_s(result) > load_end_s + 2.5)
        yield result
    finally:
        if prometheus is not None:
            _stop(prometheus)
        _stop(serve)


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


def _num_up(stack: Stack) -> int:
    return sum(float(s["value"][1]) == 1 for s in stack.query('up{job="strata"}'))


def _oldest_scrape_s(stack: Stack) -> float:
    (sample,) = stack.query('min(timestamp(up{job="strata"}))')
    return float(sample["value"][1])


def _oldest_rule_evaluation_s(stack: Stack) -> float:
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert groups, "Prometheus loaded no rule group"
    return min(_rfc3339_s(g["lastEvaluation"]) for g in groups)


def _rfc3339_s(text: str) -> float:
    """Prometheus' RFC 3339 times carry nanoseconds; datetime takes microseconds."""
    match = re.fullmatch(r"(.*?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-].*)", text)
    assert match, text
    seconds, fraction, zone = match.groups()
    parsed = datetime.fromisoformat(seconds + ("+00:00" if zone == "Z" else zone))
    return parsed.timestamp() + float(f"0.{fraction or 0}")


def _not_running_reason(expr: str) -> str | None:
    for name in sorted(metric_names(expr)):
        planned = planned_metric(name)
        if planned is not None:
            reason = next(r for p, r in _NOT_RUNNING.items() if planned.startswith(p))
            return f"{planned}: {reason}"
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
