"""Shared fixtures for the platform tests: rendered environments (cached per session, rendering
is CPU work) and strict validators for core kinds and the CRDs in ``../shared/schemas``."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from workflows.platform_cli import (
    PLATFORM_DIR,
    EnvironmentValues,
    load_environment,
    parse_objects,
    render_environment,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Karpenter's and the Prometheus Operator's CRDs: no installed package carries them (the core
# kinds come from kubernetes-validate, Argo's from Hera). STRATA_CRD_SCHEMAS names a folder of
# the upstream CRD files; else the team's ../shared/schemas.
SCHEMAS_DIR = Path(os.environ.get("STRATA_CRD_SCHEMAS") or REPO_ROOT.parent / "shared" / "schemas")
ENVIRONMENTS_DIR = PLATFORM_DIR / "environments"
ENVIRONMENTS = ("g6-aggregated", "p5-disagg-efa", "p6-b200")
# (apiVersion, kind) -> CRD file in ../shared/schemas
CRD_FILES = {
    ("karpenter.sh/v1", "NodePool"): "karpenter.sh_nodepools.aws-provider.yaml",
    ("karpenter.k8s.aws/v1", "EC2NodeClass"): "karpenter.k8s.aws_ec2nodeclasses.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


class Rendered:
    """One environment's values, rendered files and parsed objects."""

    def __init__(self, name: str, env: EnvironmentValues) -> None:
        self.name = name
        self.env = env
        self.files = render_environment(env)
        self.objects = parse_objects(self.files)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found


def environment(name: str) -> EnvironmentValues:
    return load_environment(ENVIRONMENTS_DIR / f"{name}.yaml")


@pytest.fixture(scope="session")
def rendered_envs() -> dict[str, Rendered]:
    return {name: Rendered(name, environment(name)) for name in ENVIRONMENTS}


def render_with(name: str, **sections: Any) -> Rendered:
    """An example environment with some sections' values updated (deep-merged)."""
    raw = environment(name).model_dump(exclude_none=True)
    for key, value in sections.items():
        raw[key] = _merge(raw.get(key), value)
    return Rendered(f"{name}+", EnvironmentValues.model_validate(raw))


def _merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        merged = copy.deepcopy(base)
        for key, value in update.items():
            merged[key] = _merge(merged.get(key), value)
        return merged
    return copy.deepcopy(update)


# --- CRD schemas -------------------------------------------------------------------------------


def _openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as strict JSON Schema: ``nullable`` becomes a null type,
    ``x-kubernetes-*`` keys go, and every object with properties rejects unknown fields unless
    it preserves them (``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")
    }
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _metadata_schema() -> dict[str, Any]:
    # CRDs type metadata as a bare object; check what a real API server would keep.
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
            "namespace": {"type": "string"},
            "labels": string_map,
            "annotations": string_map,
        },
    }


@pytest.fixture(scope="session")
def crd_validator() -> Callable[[dict[str, Any]], list[str]]:
    """Validate a custom resource against its CRD's schema (unknown fields rejected)."""
    if not SCHEMAS_DIR.is_dir():
        pytest.skip(
            f"CRD schemas not found at {SCHEMAS_DIR} (no package carries Karpenter's or the "
            "Prometheus Operator's CRDs: set STRATA_CRD_SCHEMAS to a folder of them)"
        )
    validators: dict[tuple[str, str], jsonschema.Validator] = {}
    for (api_version, kind), file_name in CRD_FILES.items():
        crd = yaml.safe_load((SCHEMAS_DIR / file_name).read_text())
        version = api_version.rsplit("/", 1)[1]
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = _openapi_to_jsonschema(served["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = _metadata_schema()
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        validators[(api_version, kind)] = jsonschema.Draft7Validator(schema)

    def validate(obj: dict[str, Any]) -> list[str]:
        key = (obj["apiVersion"], obj["kind"])
        if key not in validators:
            return [f"no CRD schema for {key}"]
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validators[key].iter_errors(obj)
        ]

    return validate


@pytest.fixture(scope="session")
def argo_validator() -> Callable[[dict[str, Any]], list[str]]:
    """A WorkflowTemplate against Argo's own models as Hera ships them (``tests/argo_schema.py``),
    unknown fields rejected; no ../shared needed."""
    from tests import argo_schema

    definitions = argo_schema.definitions(strict=True)

    def validate(obj: dict[str, Any]) -> list[str]:
        return argo_schema.schema_errors(definitions, "WorkflowTemplate", obj)

    return validate
