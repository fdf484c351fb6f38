"""Run a ``WorkflowSpec`` in this process, in DAG order, the way Argo would.

Each step gets its retries, with exponential backoff, for errors that another attempt may cure
(``workflows.steps.lifecycle.is_retryable``: a dead connection yes, a refused gate no); a failed
step fails the run and every step that depends on it is skipped (Argo's "Omitted"). The exit
handler (``WorkflowSpec.on_exit``, Argo's ``onExit``) runs last, whatever happened, with the
run's phase. Progress is logged per step (name, attempt, phase, duration), and the end prints
the same table the Argo UI shows: step, phase, duration, message.

Each run has an id (``PublishParams.run_id``) and a state file ``<state_dir>/<run_id>.json``
rewritten after every step. ``resume=True`` reruns a failed run the way ``argo retry`` does:
steps that succeeded keep their outputs, except those the exit handler undid (a removed
deployment), and the rest run again under the same run id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from workflows import metrics
from workflows.pipeline import PublishParams, StepSpec, WorkflowSpec

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".strata/runs")


@dataclass(slots=True)
class StepStatus:
    name: str
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Omitted
    duration_s: float = 0.0
    attempts: int = 0
    message: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # outputs taken from the resumed run's earlier attempt


@dataclass(slots=True)
class RunResult:
    workflow: str
    phase: str
    steps: dict[str, StepStatus]
    duration_s: float
    run_id: str = ""
    exit: StepStatus | None = None  # the exit handler's status, if the workflow has one

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"

    def outputs(self, step: str) -> dict[str, Any]:
        return self.steps[step].outputs


class WorkflowFailed(RuntimeError):
    def __init__(self, result: RunResult) -> None:
        failed = [s for s in result.steps.values() if s.phase == "Failed"]
        if result.exit is not None and result.exit.phase == "Failed":
            failed.append(result.exit)
        detail = "; ".join(f"{s.name}: {s.message}" for s in failed)
        super().__init__(f"workflow {result.workflow} (run {result.run_id}) failed: {detail}")
        self.result = result


def run_workflow(
    spec: WorkflowSpec,
    params: PublishParams,
    *,
    console: Console | None = None,
    raise_on_failure: bool = True,
    retry_backoff_s: float = 1.0,
    state_dir: Path | None = None,
    resume: bool = False,
    max_backoff_s: float = 60.0,
    on_retry: Callable[[str, int, Exception], None] | None = None,
) -> RunResult:
    """Run ``spec``; with ``state_dir`` its state is saved there, and ``resume`` continues the
    run ``params.run_id`` from its state file. A step's retries wait ``retry_backoff_s`` times
    2**attempt, at most ``max_backoff_s``; ``on_retry(step, attempt, error)`` is called before
    each wait."""
    console = console or Console(stderr=True)
    if not params.run_id:
        if resume:
            raise ValueError("resume needs the run id of the run to continue")
        params = dataclasses.replace(params, run_id=new_run_id())
    state_path = None if state_dir is None else Path(state_dir) / f"{params.run_id}.json"
    saved = _reusable_steps(spec, load_state(state_path)) if resume and state_path else {}
    statuses = {s.name: StepStatus(s.name) for s in spec.steps}
    backoff = _Backoff(retry_backoff_s, max_backoff_s, on_retry)
    metrics.init_model(params.name, [s.name for s in spec.steps])
    started = time.monotonic()
    verb = "resuming" if resume else "running"
    console.print(
        f"[bold]workflow {spec.name}[/] ({params.name}): {verb} run {params.run_id}, "
        f"{len(spec.steps)} steps"
    )
    try:
        for step in spec.order():
            status = statuses[step.name]
            if step.name in saved:
                status.phase, status.outputs, status.reused = "Succeeded", saved[step.name], True
                status.message = "reused from the earlier attempt"
                console.print(f"  [green]{step.name}: Succeeded[/] (reused)")
                continue
            if any(statuses[d].phase != "Succeeded" for d in step.depends):
                status.phase = "Omitted"
                status.message = "an upstream step did not succeed"
                continue
            kwargs = {arg: statuses[src].outputs[key] for arg, (src, key) in step.inputs.items()}
            _run_step(step, params, kwargs, status, console, backoff)
            _save_state(state_path, spec, params, statuses, None)
    except (
        BaseException
    ):  # Ctrl-C, SIGTERM turned into SystemExit: still clean up, as Argo's stop does
        if spec.on_exit is not None:
            console.print("  [red]interrupted[/]: running the exit handler")
            exit_status = StepStatus(spec.on_exit.name)
            _run_step(spec.on_exit, params, {"status": "Failed"}, exit_status, console, backoff)
            # What it undid (the removed deployment) is not reused by a resume.
            _save_state(state_path, spec, params, statuses, exit_status)
        raise
    phase = "Succeeded" if all(s.phase == "Succeeded" for s in statuses.values()) else "Failed"
    exit_status = None
    if spec.on_exit is not None:
        exit_status = StepStatus(spec.on_exit.name)
        _run_step(spec.on_exit, params, {"status": phase}, exit_status, console, backoff)
        if exit_status.phase != "Succeeded":
            phase = "Failed"
    _save_state(state_path, spec, params, statuses, exit_status)
    result = RunResult(
        spec.name, phase, statuses, time.monotonic() - started, params.run_id, exit_status
    )
    metrics.RUNS.labels(model=params.name, workflow=spec.name, outcome=phase.lower()).inc()
    console.print(render_table(result))
    if raise_on_failure and not result.succeeded:
        raise WorkflowFailed(result)
    return result


def new_run_id() -> str:
    return f"local-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class _Backoff:
    base_s: float
    max_s: float
    on_retry: Callable[[str, int, Exception], None] | None

    def wait(self, step: str, attempt: int, exc: Exception) -> None:
        if self.on_retry is not None:
            self.on_retry(step, attempt, exc)
        time.sleep(min(self.base_s * (2**attempt), self.max_s))  # backoff between attempts


def _run_step(
    step: StepSpec,
    params: PublishParams,
    kwargs: dict[str, Any],
    status: StepStatus,
    console: Console,
    backoff: _Backoff,
) -> None:
    """One step with its retries; fills ``status`` and records the step's metrics."""
    from workflows.steps.lifecycle import is_retryable

    status.phase = "Running"
    step_started = time.monotonic()
    for attempt in range(step.retries + 1):
        status.attempts = attempt + 1
        console.print(f"  [cyan]{step.name}[/]: running (attempt {attempt + 1})")
        try:
            status.outputs = step.fn(params, **kwargs)
            status.phase = "Succeeded"
            break
        except Exception as exc:  # a step failure is data here, reported below
            status.message = f"{type(exc).__name__}: {exc}"
            logger.debug("step %s failed:\n%s", step.name, traceback.format_exc())
            if attempt < step.retries and is_retryable(exc):
                console.print(f"  [yellow]{step.name}[/]: {status.message}; retrying")
                backoff.wait(step.name, attempt + 1, exc)
                continue
            status.phase = "Failed"
            break
    status.duration_s = time.monotonic() - step_started
    outcome = "succeeded" if status.phase == "Succeeded" else "failed"
    metrics.STEP_DURATION.labels(model=params.name, step=step.name, outcome=outcome).observe(
        status.duration_s
    )
    if status.phase == "Failed":
        metrics.STEP_FAILURES.labels(model=params.name, step=step.name).inc()
    colour = "green" if status.phase == "Succeeded" else "red"
    console.print(
        f"  [{colour}]{step.name}: {status.phase}[/] in {status.duration_s:.1f} s"
        + (f" — {status.message}" if status.phase == "Failed" else "")
    )


def load_state(path: Path | None) -> dict[str, Any]:
    """A run's saved state (empty when there is none)."""
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable run state ({exc})") from exc


def load_params(state_dir: Path, run_id: str) -> PublishParams:
    """The parameters a saved run was started with."""
    path = Path(state_dir) / f"{run_id}.json"
    state = load_state(path)
    if not state:
        raise ValueError(f"no saved run {run_id!r} in {state_dir}")
    return PublishParams.from_json(json.dumps(state["params"]))


def _reusable_steps(spec: WorkflowSpec, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Outputs of the saved run's succeeded steps, less what the exit handler undid and every
    step downstream of that."""
    if state and state.get("workflow") != spec.name:
        raise ValueError(f"the saved run is a {state.get('workflow')} run, not {spec.name}")
    steps = state.get("steps", {})
    undone = set((state.get("exit") or {}).get("outputs", {}).get("undone", []))
    reusable: dict[str, dict[str, Any]] = {}
    for step in spec.order():
        saved = steps.get(step.name, {})
        upstream_ok = all(d in reusable for d in step.depends)
        if saved.get("phase") == "Succeeded" and step.name not in undone and upstream_ok:
            reusable[step.name] = saved.get("outputs", {})
    return reusable


def _save_state(
    path: Path | None,
    spec: WorkflowSpec,
    params: PublishParams,
    statuses: dict[str, StepStatus],
    exit_status: StepStatus | None,
) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "workflow": spec.name,
        "params": json.loads(params.to_json()),
        "steps": {n: _status_json(s) for n, s in statuses.items()},
        "exit": None if exit_status is None else _status_json(exit_status),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, path)  # readers never see half a file


def _status_json(status: StepStatus) -> dict[str, Any]:
    return {
        "phase": status.phase,
        "attempts": status.attempts,
        "message": status.message,
        "outputs": status.outputs,
    }


def render_table(result: RunResult) -> Table:
    table = Table(
        title=f"{result.workflow} {result.run_id}: {result.phase} in {result.duration_s:.1f} s"
    )
    for column in ("step", "phase", "duration", "attempts", "message"):
        table.add_column(column)
    colours = {"Succeeded": "green", "Failed": "red", "Omitted": "dim"}
    rows = list(result.steps.values()) + ([result.exit] if result.exit else [])
    for status in rows:
        colour = colours.get(status.phase, "white")
        name = f"{status.name} (exit)" if status is result.exit else status.name
        table.add_row(
            name,
            f"[{colour}]{status.phase}[/]",
            f"{status.duration_s:.1f} s",
            "reused" if status.reused else str(status.attempts),
            status.message[:120],
        )
    return table
