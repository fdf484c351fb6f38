"""``strata step NAME``: run one workflow step in a container, the way Argo calls it.

The Argo templates (``workflows/argo.py``) call this with the run's ``PublishParams`` and the
step's keyword inputs as JSON, and read each output back from ``<outputs-dir>/<key>``, a file
holding the JSON-encoded value; ``<outputs-dir>/result.json`` holds the whole result. The step
itself is the same function the local runner calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from workflows.pipeline import WORKFLOWS, PublishParams, StepSpec

RESULT_FILE = "result.json"
# Exit status of a failure another attempt cannot cure (a refused gate, a failed check); the
# Argo templates retry only the others (exit status 1).
PERMANENT_FAILURE_EXIT_CODE = 3


class StepError(RuntimeError):
    """The step could not be found or run; the message says which and why."""


def find_step(name: str, workflow: str | None = None) -> StepSpec:
    """The step ``name`` of ``workflow``, or of whichever workflow defines it (once)."""
    if workflow is not None and workflow not in WORKFLOWS:
        raise StepError(f"unknown workflow {workflow!r}; known: {', '.join(sorted(WORKFLOWS))}")
    names = [workflow] if workflow else sorted(WORKFLOWS)
    found: list[tuple[str, StepSpec]] = []
    for wf_name in names:
        spec = WORKFLOWS[wf_name]()
        steps = [*spec.steps, *([spec.on_exit] if spec.on_exit else [])]
        found += [(wf_name, step) for step in steps if step.name == name]
    if not found:
        where = workflow or " or ".join(names)
        raise StepError(f"no step named {name!r} in {where}")
    if len(found) > 1:
        owners = ", ".join(wf for wf, _ in found)
        raise StepError(f"step {name!r} is in several workflows ({owners}): pass --workflow")
    return found[0][1]


def parse_params(params_json: str) -> PublishParams:
    """``PublishParams`` from JSON; an empty string for a field whose default is None is None.

    Argo parameters are strings, so an unset optional one (``s3-endpoint-url: ""``) arrives empty.
    """
    try:
        data = json.loads(params_json)
    except json.JSONDecodeError as exc:
        raise StepError(f"--params is not valid JSON ({exc}): {params_json!r}") from exc
    if not isinstance(data, dict):
        raise StepError(f"--params must be a JSON object, got {type(data).__name__}")
    fields = PublishParams.__dataclass_fields__
    for key, value in data.items():
        if value == "" and key in fields and fields[key].default is None:
            data[key] = None
    try:
        return PublishParams.from_json(json.dumps(data))
    except (TypeError, ValueError) as exc:
        raise StepError(f"bad --params: {exc}") from exc


def parse_inputs(inputs_json: str) -> dict[str, Any]:
    try:
        inputs = json.loads(inputs_json)
    except json.JSONDecodeError as exc:
        raise StepError(f"--inputs is not valid JSON ({exc}): {inputs_json!r}") from exc
    if not isinstance(inputs, dict):
        raise StepError(f"--inputs must be a JSON object, got {type(inputs).__name__}")
    return inputs


def run_step(step: StepSpec, params: PublishParams, inputs: dict[str, Any]) -> dict[str, Any]:
    """Call the step function with exactly the inputs its spec declares."""
    missing = sorted(set(step.inputs) - set(inputs))
    unexpected = sorted(set(inputs) - set(step.inputs))
    if missing or unexpected:
        raise StepError(
            f"step {step.name}: inputs do not match its spec"
            f" (missing {missing or 'none'}, unexpected {unexpected or 'none'})"
        )
    result = step.fn(params, **inputs)
    if not isinstance(result, dict):
        raise StepError(f"step {step.name} returned {type(result).__name__}, not a dict")
    return result


def write_outputs(result: dict[str, Any], outputs_dir: Path) -> list[Path]:
    """One file per output key (its JSON-encoded value) plus ``result.json``; returns the paths."""
    outputs_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, value in result.items():
        if "/" in key or key in {"", ".", "..", RESULT_FILE}:
            raise StepError(f"output key {key!r} cannot be a file name")
        path = outputs_dir / key
        path.write_text(json.dumps(value))
        paths.append(path)
    path = outputs_dir / RESULT_FILE
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return [*paths, path]


def step(
    name: Annotated[str, typer.Argument(help="Step to run, e.g. stage, verify, promote.")],
    params_json: Annotated[
        str, typer.Option("--params", help="The run's PublishParams as a JSON object.")
    ],
    inputs_json: Annotated[
        str, typer.Option("--inputs", help="The step's keyword inputs as a JSON object.")
    ] = "{}",
    outputs_dir: Annotated[
        Path,
        typer.Option(
            "--outputs-dir",
            help="Where to write one file per output (JSON) and result.json.",
            envvar="STRATA_STEP_OUTPUTS_DIR",
            show_envvar=True,
        ),
    ] = Path("/tmp/outputs"),
    workflow: Annotated[
        str | None,
        typer.Option(
            "--workflow", help="Workflow that defines the step (default: the one that has it)."
        ),
    ] = None,
) -> None:
    """Run one workflow step with JSON params and inputs; write its outputs as files."""
    start = time.monotonic()
    try:
        spec = find_step(name, workflow)
        params = parse_params(params_json)
        inputs = parse_inputs(inputs_json)
        typer.echo(f"step {name}: started", err=True)
        result = run_step(spec, params, inputs)
        write_outputs(result, outputs_dir)
    except Exception as exc:  # every failure ends as exit code 1 or 3 with the cause named
        from workflows.steps.lifecycle import is_retryable

        elapsed_s = time.monotonic() - start
        retryable = is_retryable(exc) and not isinstance(exc, StepError)
        typer.echo(
            f"step {name}: failed after {elapsed_s:.1f}s: {type(exc).__name__}: {exc}"
            + ("" if retryable else " (not retryable)"),
            err=True,
        )
        raise typer.Exit(1 if retryable else PERMANENT_FAILURE_EXIT_CODE) from exc
    typer.echo(json.dumps(result, indent=2, sort_keys=True))
    typer.echo(f"step {name}: succeeded in {time.monotonic() - start:.1f}s", err=True)
