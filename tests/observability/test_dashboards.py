"""Dashboards: committed JSON equals the generator's output, carries what Grafana requires, every
expression parses (promtool's PromQL parser), selects metrics that exist or are planned and
filters them by the model label they carry; the disaggregation rows hold their panels;
ConfigMaps, kustomization and provisioning files render."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from grafana.generate import render_files, stale_files
from grafana.panels import parse_label_values
from grafana.planned_metrics import PLANNED_METRICS
from tests.observability.conftest import (
    DASHBOARD_DIR,
    MONITORING_DIR,
    NO_PROMTOOL,
    PROMTOOL,
    REPO_ROOT,
    dashboard_queries,
    exposed_metric_names,
    exposed_series_labels,
    load_dashboards,
    metric_names,
    planned_metric,
    run_promtool,
    substitute,
)

DASHBOARDS = load_dashboards()
IDS = [d["uid"] for d in DASHBOARDS]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_KUBECTL_APPLY_ANNOTATION_LIMIT_BYTES = 262_144


def test_committed_files_equal_the_generators_output() -> None:
    assert stale_files() == [], "out of date: run `python -m grafana.generate` and commit"
    json_files = {p.name for p in DASHBOARD_DIR.glob("*.json")}
    generated = {p.name for p in render_files() if p.suffix == ".json"}
    assert json_files == generated, "grafana/dashboards holds a file the generator does not write"


def test_dashboards_are_the_expected_five() -> None:
    assert sorted(IDS) == sorted(
        ["strata-serving", "strata-router", "strata-workers", "strata-lifecycle", "strata-planner"]
    )
    assert len({d["title"] for d in DASHBOARDS}) == len(DASHBOARDS)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_dashboard_has_what_grafana_requires(dashboard: dict) -> None:
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    parse_label_values(model["query"]["query"])
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert isinstance(panel["id"], int) and panel["title"] and panel["type"]
        if panel["type"] == "row":  # an expanded row: its panels follow it at the top level
            assert panel["gridPos"]["w"] == 24 and panel["gridPos"]["h"] == 1
            assert panel["collapsed"] is False and panel["panels"] == []
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in grid.values())
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
            assert "$model" in target["expr"] or not _has_model_label(target["expr"]), (
                f"{panel['title']}: query on a model-labelled metric ignores $model"
            )


def _has_model_label(expr: str) -> bool:
    """Metrics that carry ``model``/``model_name`` (every frontend and router series does)."""
    prefixes = (
        "strata_frontend_",
        "vllm:",
        "strata_worker_",
        "strata_kv_",
        "strata_router_",
    )
    return any(n.startswith(prefixes) for n in metric_names(expr))


def _model_matchers() -> dict[str, str]:
    """Series name -> the ``$model`` matcher its selectors need: ``model_name`` on worker
    series, ``model`` on frontend and router series and on planned metrics."""
    matchers = {}
    for component, label, matcher in (("worker", "model_name", 'model_name=~"$model"'),
                                      ("frontend", "model", 'model=~"$model"'),
                                      ("planner", "model", 'model=~"$model"')):  # fmt: skip
        for name, labels in exposed_series_labels(component).items():
            if label in labels:
                matchers[name] = matcher
    for name, (kind, labels, _) in PLANNED_METRICS.items():
        if "model" in labels.split(", "):
            suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            matchers |= {name + suffix: 'model=~"$model"' for suffix in suffixes}
    return matchers


def test_model_matcher_fits_the_metric() -> None:
    """Every selector of a model-labelled series filters by ``$model`` on the label that series
    has (a ``model`` matcher on a worker's ``model_name`` series selects nothing)."""
    matchers = _model_matchers()
    wrong = []
    for query in dashboard_queries():
        for name in metric_names(query.expr) & set(matchers):
            pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?"
            for match in re.finditer(pattern, query.expr):
                if matchers[name] not in (match.group(1) or ""):
                    wrong.append(f"{query.name}: {name} needs {matchers[name]}")
    assert wrong == []


def _rows(dashboard: dict) -> dict[str, list[dict]]:
    """Row title -> the panels under it ("" for those above the first row)."""
    rows: dict[str, list[dict]] = {"": []}
    current = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = []
        else:
            rows[current].append(panel)
    return rows


def test_disaggregation_rows() -> None:
    by_uid = {d["uid"]: d for d in DASHBOARDS}
    router = _rows(by_uid["strata-router"])["Disaggregation"]
    assert [p["title"] for p in router] == ["Prefill placement decisions", "Remote prefill latency"]
    decisions, latency = router
    assert "sum by (decision)" in decisions["targets"][0]["expr"]
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p99"]
    workers = {
        p["title"]: p for p in _rows(by_uid["strata-workers"])["Disaggregation and KV transfer"]
    }
    assert list(workers) == [
        "Workers by role and KV transport", "Workers by role", "Workers on TCP fallback",
        "KV pulls by outcome", "KV pull time", "KV transfer bytes per second", "KV leases held",
        "KV leases ended by how",
    ]  # fmt: skip
    # The workers table: one row per worker, fallback="true" on a red background.
    table = workers["Workers by role and KV transport"]
    assert table["type"] == "table" and table["targets"][0]["instant"] is True
    columns = table["transformations"][0]["options"]["include"]["names"]
    assert columns == ["instance", "role", "transport", "fallback"]
    (override,) = table["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byName", "options": "fallback"}
    properties = {prop["id"]: prop["value"] for prop in override["properties"]}
    assert properties["mappings"][0]["options"]["true"]["color"] == "red"
    assert properties["custom.cellOptions"] == {"type": "color-background"}
    # The fallback count turns red at one worker.
    fallback = workers["Workers on TCP fallback"]
    steps = fallback["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps == [{"color": "green", "value": None}, {"color": "red", "value": 1}]
    assert 'fallback="true"' in fallback["targets"][0]["expr"]
    pull_time = workers["KV pull time"]["targets"]
    assert [t["legendFormat"] for t in pull_time] == ["{{transport}} p50", "{{transport}} p99"]
    transfer = workers["KV transfer bytes per second"]["targets"][0]["expr"]
    assert "strata_kv_transfer_bytes_total" in transfer and "transport" in transfer


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_panels_do_not_overlap(dashboard: dict) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_every_panel_expression_parses(tmp_path: Path) -> None:
    """promtool parses each query (variables filled in) as a recording rule of its own group,
    so an error names the dashboard and panel."""
    queries = dashboard_queries()
    rule_file = _write_queries_as_rules(tmp_path / "queries.yaml", [q.name for q in queries],
                                        [substitute(q.expr, "m") for q in queries])  # fmt: skip
    result = run_promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    # The same check rejects a broken query and names its panel.
    broken = _write_queries_as_rules(tmp_path / "broken.yaml", ["Serving / Broken [A]"],
                                     ['sum(rate(x{model="m"}[1m])'])  # fmt: skip
    result = run_promtool("check", "rules", str(broken))
    assert result.returncode != 0 and "Serving / Broken [A]" in result.stdout + result.stderr


def _write_queries_as_rules(path: Path, names: list[str], exprs: list[str]) -> Path:
    groups = [
        {"name": name, "rules": [{"record": f"dashboard_query_{i}", "expr": expr}]}
        for i, (name, expr) in enumerate(zip(names, exprs, strict=True))
    ]
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_every_metric_is_exposed_or_planned() -> None:
    exposed = exposed_metric_names()
    unknown = {
        f"{q.name}: {name}"
        for q in dashboard_queries()
        for name in metric_names(q.expr)
        if name not in exposed and planned_metric(name) is None
    }
    assert not unknown, "metrics neither exposed by serving/ nor in grafana.planned_metrics"
    now_exposed = {planned_metric(name) for name in exposed} - {None}
    assert not now_exposed, "exposed now: move these out of grafana/planned_metrics.py"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_config_map_renders(dashboard: dict) -> None:
    path = MONITORING_DIR / "dashboards" / f"{dashboard['uid']}.yaml"
    text = path.read_text()
    config_map = yaml.safe_load(text)
    assert config_map["apiVersion"] == "v1" and config_map["kind"] == "ConfigMap"
    meta = config_map["metadata"]
    assert _DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63
    assert meta["namespace"] and meta["labels"]["grafana_dashboard"] == "1"
    (key, body), *rest = config_map["data"].items()
    assert not rest and key == f"{dashboard['uid']}.json"
    assert json.loads(body) == dashboard
    assert len(text.encode()) < _KUBECTL_APPLY_ANNOTATION_LIMIT_BYTES
    _kubernetes_validate(config_map)


def _kubernetes_validate(document: dict) -> None:
    """Validate against Kubernetes' own schemas where ``kubernetes-validate`` is installed;
    the structural checks above stand without it."""
    try:
        import kubernetes_validate  # type: ignore[import-not-found]
    except ImportError:
        return
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_object() -> None:
    kustomization = yaml.safe_load((MONITORING_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {
        str(p.relative_to(MONITORING_DIR))
        for p in MONITORING_DIR.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "rules" not in p.relative_to(MONITORING_DIR).parts
    }
    assert listed == on_disk


def test_provisioning_files_point_at_the_dashboards() -> None:
    provisioning = REPO_ROOT / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "strata.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    providers = yaml.safe_load((provisioning / "dashboards" / "strata.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_platform_holds_no_python() -> None:
    assert list((REPO_ROOT / "platform").rglob("*.py")) == []
