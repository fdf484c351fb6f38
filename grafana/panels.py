"""Grafana dashboard JSON from plain values: dashboards, panels, queries, variables, layout.

Owns the JSON shape Grafana expects (schema version 39); knows no metric names and does no I/O.
Every panel and query uses the ``${datasource}`` variable, and every dashboard has a ``model``
variable whose values come from a ``label_values(metric, label)`` query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
PanelKind = Literal["timeseries", "stat", "bargauge"]

_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[^,]+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression; ``legend`` is Grafana's legend format (``{{label}}``)."""

    expr: str
    legend: str = "__auto"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: PanelKind = "timeseries"
    width: int = 12
    height: int = 8
    stack: bool = False


@dataclass(frozen=True)
class Dashboard:
    """A dashboard; ``model_values`` is ``label_values(metric, label)`` for the model variable."""

    uid: str
    title: str
    description: str
    model_values: str
    panels: tuple[Panel, ...]

    @property
    def file_name(self) -> str:
        return f"{self.uid}.json"


def parse_label_values(query: str) -> tuple[str, str]:
    """``label_values(metric, label)`` -> ``(metric, label)``; raises ``ValueError`` otherwise."""
    match = _LABEL_VALUES.match(query.strip())
    if match is None:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return match["metric"].strip(), match["label"]


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    parse_label_values(dashboard.model_values)  # fail at generation, not in Grafana
    panels = [
        _panel_json(panel, panel_id, grid)
        for panel_id, (panel, grid) in enumerate(_layout(dashboard.panels), start=1)
    ]
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["strata"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": [_builtin_annotation()]},
        "templating": {"list": [_datasource_variable(), _model_variable(dashboard.model_values)]},
        "links": [],
        "panels": panels,
    }


def _layout(panels: tuple[Panel, ...]) -> list[tuple[Panel, dict[str, int]]]:
    """Left to right, wrapping at 24 columns; a row is as tall as its tallest panel."""
    x = y = row_height = 0
    placed = []
    for panel in panels:
        if x + panel.width > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        placed.append((panel, {"h": panel.height, "w": panel.width, "x": x, "y": y}))
        x += panel.width
        row_height = max(row_height, panel.height)
    return placed


def _panel_json(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": query.expr,
            "legendFormat": query.legend,
            "range": True,
        }
        for i, query in enumerate(panel.queries)
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": _field_defaults(panel), "overrides": []},
        "options": _options(panel.kind),
        "targets": targets,
    }


def _field_defaults(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "color": {"mode": "palette-classic"}}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    else:
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
    return defaults


def _options(kind: PanelKind) -> dict[str, Any]:
    if kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if kind == "stat":
        return {"reduceOptions": reduce, "colorMode": "value", "graphMode": "area",
                "textMode": "auto", "orientation": "auto", "justifyMode": "auto"}  # fmt: skip
    return {"reduceOptions": reduce, "orientation": "horizontal", "displayMode": "gradient",
            "showUnfilled": True}  # fmt: skip


def _datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def _model_variable(model_values: str) -> dict[str, Any]:
    return {
        "name": "model",
        "label": "Model",
        "type": "query",
        "datasource": DATASOURCE,
        "definition": model_values,
        "query": {"query": model_values, "refId": "StandardVariableQuery"},
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def _builtin_annotation() -> dict[str, Any]:
    return {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
