"""Argo's types as a strict JSON schema, from Argo's own models as Hera ships them.

``hera.workflows.models`` is generated from Argo's OpenAPI spec; pydantic writes the JSON schema
of those models, and ``strict`` adds ``additionalProperties: false`` to every object schema that
lists properties, so a misspelt field is an error. No file outside the repository is needed.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
from hera.workflows.models import WorkflowCreateRequest, WorkflowTemplate
from pydantic.json_schema import models_json_schema


@functools.cache
def _definitions(strict: bool) -> dict[str, Any]:
    _, top = models_json_schema(
        [(WorkflowTemplate, "validation"), (WorkflowCreateRequest, "validation")],
        by_alias=True,
        ref_template="#/definitions/{model}",
    )
    definitions = top["$defs"]
    if strict:
        make_strict(definitions)
    return definitions


def definitions(strict: bool = True) -> dict[str, Any]:
    """Type name (``WorkflowTemplate``, ``Container``, ...) -> JSON schema."""
    return _definitions(strict)


def make_strict(node: Any) -> None:
    """Add ``additionalProperties: false`` to every object schema with properties and none set."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            make_strict(value)
    elif isinstance(node, list):
        for value in node:
            make_strict(value)


def schema_errors(defs: dict[str, Any], kind: str, document: Any) -> list[str]:
    """``path: message`` for each way ``document`` is not a valid ``kind``."""
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"#/definitions/{kind}", "definitions": defs}
    )
    return sorted({_describe(leaf) for e in validator.iter_errors(document) for leaf in _leaves(e)})


def _leaves(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors under an ``anyOf`` (pydantic writes every optional field as one with
    ``null``), less the branch that only says the value is not null."""
    if not error.context:
        return [error]
    leaves = [leaf for sub in error.context for leaf in _leaves(sub)]
    return [e for e in leaves if not (e.validator == "type" and e.validator_value == "null")]


def _describe(error: jsonschema.ValidationError) -> str:
    return f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
