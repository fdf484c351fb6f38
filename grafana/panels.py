"""Grafana dashboard JSON from plain values: dashboards, panels, queries, variables, layout.

Owns the JSON shape Grafana expects (schema version 39); knows no metric names and does no I/O.
Every panel and query uses the ``${datasource}`` variable, and every dashboard has a ``model``
variable whose values come from a ``label_values(metric, label)`` query. A ``Row`` heads the
panels after it (Grafana's row panel, expanded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
PanelKind = Literal["timeseries", "stat", "bargauge", "table"]
# (from value, colour) steps; the first step's value is None (minus infinity).
Thresholds = tuple[tuple[float | None, str], ...]

_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[^,]+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression; ``legend`` is Grafana's legend format (``{{label}}``)."""

    expr: str
    legend: str = "__auto"


@dataclass(frozen=True)
class CellColor:
    """Table cells of ``column`` whose text is ``value``: a ``color`` background, ``text`` shown."""

    column: str
    value: str
    color: str
    text: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel. ``thresholds`` colour stat and bargauge values. A ``table`` shows one row per
    series of an instant query, with the label ``columns`` in that order (the info-metric view);
    ``cell_colors`` highlight values of those columns."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: PanelKind = "timeseries"
    width: int = 12
    height: int = 8
    stack: bool = False
    thresholds: Thresholds = ((None, "green"),)
    columns: tuple[str, ...] = ()
    cell_colors: tuple[CellColor, ...] = ()

    def __post_init__(self) -> None:
        if (self.kind == "table") != bool(self.columns):
            raise ValueError(f"{self.title}: a table needs columns, and only a table has them")
        unknown = {c.column for c in self.cell_colors} - set(self.columns)
        if unknown:
            raise ValueError(f"{self.title}: cell colours for columns it does not show: {unknown}")


@dataclass(frozen=True)
class Row:
    """A full-width row header; the panels after it (up to the next row) belong to it."""

    title: str


@dataclass(frozen=True)
class Dashboard:
    """A dashboard; ``model_values`` is ``label_values(metric, label)`` for the model variable."""

    uid: str
    title: str
    description: str
    model_values: str
    panels: tuple[Panel | Row, ...]

    @property
    def file_name(self) -> str:
        return f"{self.uid}.json"


def thirds(*panels: Panel) -> tuple[Panel, ...]:
    """The panels a third of the grid wide: three to a row."""
    return tuple(replace(panel, width=GRID_WIDTH // 3) for panel in panels)


def parse_label_values(query: str) -> tuple[str, str]:
    """``label_values(metric, label)`` -> ``(metric, label)``; raises ``ValueError`` otherwise."""
    match = _LABEL_VALUES.match(query.strip())
    if match is None:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return match["metric"].strip(), match["label"]


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    parse_label_values(dashboard.model_values)  # fail at generation, not in Grafana
    panels = [
        _row_json(panel, panel_id, grid) if isinstance(panel, Row) else
        _panel_json(panel, panel_id, grid)
        for panel_id, (panel, grid) in enumerate(_layout(dashboard.panels), start=1)
    ]  # fmt: skip
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


def _layout(panels: tuple[Panel | Row, ...]) -> list[tuple[Panel | Row, dict[str, int]]]:
    """Left to right, wrapping at 24 columns; a line is as tall as its tallest panel. A ``Row``
    takes a line of its own, one unit high."""
    x = y = row_height = 0
    placed: list[tuple[Panel | Row, dict[str, int]]] = []
    for panel in panels:
        width, height = (GRID_WIDTH, 1) if isinstance(panel, Row) else (panel.width, panel.height)
        if x + width > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        placed.append((panel, {"h": height, "w": width, "x": x, "y": y}))
        x += width
        row_height = max(row_height, height)
    return placed


def _row_json(row: Row, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "row",
        "title": row.title,
        "collapsed": False,
        "gridPos": grid,
        "panels": [],
    }


def _panel_json(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    table = panel.kind == "table"
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": query.expr,
            "legendFormat": query.legend,
            **({"format": "table", "instant": True, "range": False} if table else {"range": True}),
        }
        for i, query in enumerate(panel.queries)
    ]
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": _field_defaults(panel), "overrides": _overrides(panel)},
        "options": _options(panel.kind),
        "targets": targets,
    }
    if table:
        out["transformations"] = [
            {"id": "filterFieldsByName", "options": {"include": {"names": list(panel.columns)}}},
            {"id": "organize", "options": {
                "indexByName": {name: i for i, name in enumerate(panel.columns)}}},
        ]  # fmt: skip
    return out


def _overrides(panel: Panel) -> list[dict[str, Any]]:
    """Per-column value mappings with a coloured cell background (``cell_colors``)."""
    overrides = []
    for column in dict.fromkeys(c.column for c in panel.cell_colors):
        mapping = {
            c.value: {"text": c.text or c.value, "color": c.color, "index": i}
            for i, c in enumerate(c for c in panel.cell_colors if c.column == column)
        }
        overrides.append({
            "matcher": {"id": "byName", "options": column},
            "properties": [
                {"id": "mappings", "value": [{"type": "value", "options": mapping}]},
                {"id": "custom.cellOptions", "value": {"type": "color-background"}},
            ],
        })  # fmt: skip
    return overrides


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
        steps = [{"color": color, "value": value} for value, color in panel.thresholds]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
        if panel.kind == "table":
            defaults["custom"] = {"align": "auto", "cellOptions": {"type": "auto"}}
    return defaults


def _options(kind: PanelKind) -> dict[str, Any]:
    if kind == "timeseries":
        return {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if kind == "table":
        return {"showHeader": True, "cellHeight": "sm"}
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
