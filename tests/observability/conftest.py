"""Observability test helpers: dashboard queries with Grafana's variables filled in, metric names
referenced by an expression, the metric names Strata's code exposes, and promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grafana.planned_metrics import PLANNED_METRICS

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "grafana" / "dashboards"
MONITORING_DIR = REPO_ROOT / "platform" / "monitoring"
RULES_FILE = MONITORING_DIR / "rules" / "strata-rules.yaml"
RULE_TESTS_DIR = MONITORING_DIR / "rules" / "tests"
SCHEMAS_DIR = REPO_ROOT.parent / "shared" / "schemas"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not on PATH: apt-get install prometheus (.ci/run installs it in CI)"

_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless", "le", "inf", "nan"}  # fmt: skip


@dataclass(frozen=True)
class DashboardQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    row: str = ""  # the title of the row the panel is in ("" above the first row)

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref_id}]"


def load_dashboards() -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))]


def dashboard_queries() -> list[DashboardQuery]:
    queries = []
    for d in load_dashboards():
        row = ""
        for panel in d["panels"]:
            if panel["type"] == "row":
                row = panel["title"]
                continue
            queries += [
                DashboardQuery(d["title"], panel["title"], target["refId"], target["expr"], row)
                for target in panel["targets"]
            ]
    return queries


def load_rules() -> list[dict]:
    """Every rule of the plain rule file, with its group name under ``group``."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule | {"group": g["name"]} for g in groups for rule in g["rules"]]


def substitute(expr: str, model: str, rate_interval: str = "1m", time_range: str = "5m") -> str:
    """Fill in Grafana's variables as Grafana does for one selected model."""
    for name, value in (
        ("${datasource}", "prometheus"),
        ("$__rate_interval", rate_interval),
        ("$__range", time_range),
        ("$__interval", "5s"),
        ("${model}", model),
        ("$model", model),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label values and strings removed first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    names = {m.group(1) for m in _IDENTIFIER.finditer(expr) if m.group(2) is None}  # not calls
    return {n for n in names if n.lower() not in _NOT_METRICS}


def planned_metric(name: str) -> str | None:
    """The planned metric (``grafana.planned_metrics``) that ``name`` is a series of, if any."""
    for suffix in ("", *_HISTOGRAM_SUFFIXES):
        if suffix and not name.endswith(suffix):
            continue
        base = name.removesuffix(suffix) if suffix else name
        if base in PLANNED_METRICS:
            return base
    return None


def _registries() -> dict[str, Any]:
    from serving.frontend.metrics import FrontendMetrics
    from serving.kvcache.metrics import TierMetrics
    from serving.planner.metrics import PlannerMetrics
    from serving.worker.metrics import WorkerMetrics
    from workflows.metrics import WORKFLOW_REGISTRY

    worker = WorkerMetrics("m")
    # A worker with KV tiers (--kv-host-gib, ...) adds the strata_kv_tier_* families.
    TierMetrics(worker.registry, worker.labels, ("G2", "G3", "G4"), worker.transfer_bytes_family)
    return {
        "worker": worker.registry,
        "frontend": FrontendMetrics("m").registry,
        "workflow": WORKFLOW_REGISTRY,
        "planner": PlannerMetrics("m", ("prefill", "decode", "both")).registry,
    }


def exposed_metric_names() -> set[str]:
    """Series names the workers' and frontend's registries expose (with the suffixes)."""
    names: set[str] = set()
    for registry in _registries().values():
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(family.name + s for s in _HISTOGRAM_SUFFIXES)
            else:
                names.add(family.name)
    return names


def exposed_series_labels(component: str) -> dict[str, set[str]]:
    """Series name -> label names, for the series ``component``'s registry has at start-up
    (``worker`` or ``frontend``; children that appear on first use are not there yet)."""
    labels: dict[str, set[str]] = {}
    for family in _registries()[component].collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
