"""Prometheus rules: ``promtool check rules``, the rule unit tests (``promtool test rules``), and
the PrometheusRule CRD that carries the same groups for kube-prometheus-stack."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml

from grafana.generate import PROMETHEUS_RULE_FILE
from grafana.promql import ITL_SLO_LE, TTFT_SLO_LE
from tests.observability.conftest import (
    NO_PROMTOOL,
    PROMTOOL,
    REPO_ROOT,
    RULE_TESTS_DIR,
    RULES_FILE,
    SCHEMAS_DIR,
    exposed_metric_names,
    load_rules,
    metric_names,
    planned_metric,
    run_promtool,
)

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
CRD_SCHEMA = SCHEMAS_DIR / "monitoring.coreos.com_prometheusrules.yaml"


@needs_promtool
def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    test_files = sorted(str(p) for p in RULE_TESTS_DIR.glob("*.yaml"))
    assert test_files
    result = run_promtool("test", "rules", *test_files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(test_files)


def test_every_alert_is_unit_tested() -> None:
    tested = {
        case["alertname"]
        for path in RULE_TESTS_DIR.glob("*.yaml")
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts - tested == set(), "alerts no unit test sees firing"


def test_alerts_carry_severity_and_text() -> None:
    for rule in load_rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_select_exposed_planned_or_recorded_metrics() -> None:
    rules = load_rules()
    known = exposed_metric_names() | {rule["record"] for rule in rules if "record" in rule}
    unknown = {
        f"{rule.get('record') or rule.get('alert')}: {name}"
        for rule in rules
        for name in metric_names(rule["expr"])
        if name not in known and planned_metric(name) is None
    }
    assert not unknown


def test_slo_thresholds_match_the_dashboards() -> None:
    for rule in load_rules():
        expr = rule["expr"]
        if "_bucket{le=" in expr and "time_to_first_token" in expr:
            assert f'le="{TTFT_SLO_LE}"' in expr, rule["record"]
        if "_bucket{le=" in expr and "inter_token_latency" in expr:
            assert f'le="{ITL_SLO_LE}"' in expr, rule["record"]


def test_prometheus_rule_carries_the_rule_file() -> None:
    prometheus_rule = _load_prometheus_rule()
    rule_file = yaml.safe_load(RULES_FILE.read_text())
    assert prometheus_rule["kind"] == "PrometheusRule"
    assert prometheus_rule["spec"]["groups"] == rule_file["groups"]
    assert prometheus_rule["metadata"]["labels"]["release"]


def test_prometheus_rule_validates_against_the_crd_schema() -> None:
    if not CRD_SCHEMA.is_file():
        pytest.skip(f"PrometheusRule CRD not found at {CRD_SCHEMA} (needs the shared/ folder)")
    crd = yaml.safe_load(CRD_SCHEMA.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    prometheus_rule = _load_prometheus_rule()
    jsonschema.Draft7Validator(schema).validate(prometheus_rule)
    broken = copy.deepcopy(prometheus_rule)
    broken["spec"]["groups"][0]["rules"][0]["recrod"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def _load_prometheus_rule() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / PROMETHEUS_RULE_FILE).read_text())


def _strict(schema: Any) -> Any:
    """The API server prunes unknown fields; reject them instead, so typos fail here."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
