"""Run a ``WorkflowSpec`` in this process, in DAG order, the way Argo would.

Each step gets its retries; a failed step fails the run and every step that depends on it is
skipped (Argo's "Omitted"). Progress is logged per step (name, attempt, phase, duration), and
the end prints the same table the Argo UI shows: step, phase, duration, message.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from workflows import metrics
from workflows.pipeline import PublishParams, WorkflowSpec

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepStatus:
    name: str
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Omitted
    duration_s: float = 0.0
    attempts: int = 0
    message: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RunResult:
    workflow: str
    phase: str
    steps: dict[str, StepStatus]
    duration_s: float

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"

    def outputs(self, step: str) -> dict[str, Any]:
        return self.steps[step].outputs


class WorkflowFailed(RuntimeError):
    def __init__(self, result: RunResult) -> None:
        failed = [s for s in result.steps.values() if s.phase == "Failed"]
        detail = "; ".join(f"{s.name}: {s.message}" for s in failed)
        super().__init__(f"workflow {result.workflow} failed: {detail}")
        self.result = result


def run_workflow(
    spec: WorkflowSpec,
    params: PublishParams,
    *,
    console: Console | None = None,
    raise_on_failure: bool = True,
    retry_backoff_s: float = 1.0,
) -> RunResult:
    console = console or Console(stderr=True)
    statuses = {s.name: StepStatus(s.name) for s in spec.steps}
    metrics.init_model(params.name, [s.name for s in spec.steps])
    started = time.monotonic()
    console.print(f"[bold]workflow {spec.name}[/] ({params.name}): {len(spec.steps)} steps")
    for step in spec.order():
        status = statuses[step.name]
        upstream = [statuses[d] for d in step.depends]
        if any(u.phase != "Succeeded" for u in upstream):
            status.phase = "Omitted"
            status.message = "an upstream step did not succeed"
            continue
        kwargs = {arg: statuses[src].outputs[key] for arg, (src, key) in step.inputs.items()}
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
                retryable = not _is_gate_failure(exc)
                if attempt < step.retries and retryable:
                    console.print(f"  [yellow]{step.name}[/]: {status.message}; retrying")
                    time.sleep(retry_backoff_s * (2**attempt))
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
    phase = "Succeeded" if all(s.phase == "Succeeded" for s in statuses.values()) else "Failed"
    result = RunResult(spec.name, phase, statuses, time.monotonic() - started)
    metrics.RUNS.labels(model=params.name, workflow=spec.name, outcome=phase.lower()).inc()
    console.print(render_table(result))
    if raise_on_failure and not result.succeeded:
        raise WorkflowFailed(result)
    return result


def _is_gate_failure(exc: Exception) -> bool:
    """A failed gate or check will fail the same way again: do not retry it."""
    from workflows.steps.lifecycle import StepFailed

    names = {type(exc).__name__} | {t.__name__ for t in type(exc).__mro__}
    return isinstance(exc, StepFailed) or bool(names & {"VerifyError", "RegistryError"})


def render_table(result: RunResult) -> Table:
    table = Table(title=f"{result.workflow}: {result.phase} in {result.duration_s:.1f} s")
    for column in ("step", "phase", "duration", "attempts", "message"):
        table.add_column(column)
    colours = {"Succeeded": "green", "Failed": "red", "Omitted": "dim"}
    for status in result.steps.values():
        colour = colours.get(status.phase, "white")
        table.add_row(
            status.name,
            f"[{colour}]{status.phase}[/]",
            f"{status.duration_s:.1f} s",
            str(status.attempts),
            status.message[:120],
        )
    return table
