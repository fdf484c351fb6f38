"""The local runner executes the one workflow definition in DAG order, as Argo would."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from workflows.local_runner import WorkflowFailed, run_workflow
from workflows.pipeline import PublishParams, StepSpec, WorkflowSpec, publish_workflow
from workflows.steps.lifecycle import StepFailed

PARAMS = PublishParams(name="m", source="s3://b/p/")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_outputs_flow_to_inputs_in_dag_order() -> None:
    calls: list[str] = []

    def a(params: PublishParams) -> dict:
        calls.append("a")
        return {"x": 2}

    def b(params: PublishParams, x: int) -> dict:
        calls.append("b")
        return {"y": x * 10}

    def c(params: PublishParams, x: int, y: int) -> dict:
        calls.append("c")
        return {"z": x + y}

    spec = WorkflowSpec("w", (
        StepSpec("a", a),
        StepSpec("b", b, depends=("a",), inputs={"x": ("a", "x")}),
        StepSpec("c", c, depends=("a", "b"), inputs={"x": ("a", "x"), "y": ("b", "y")}),
    ))  # fmt: skip
    result = run_workflow(spec, PARAMS, console=quiet())
    assert calls == ["a", "b", "c"]
    assert result.succeeded and result.outputs("c") == {"z": 22}
    assert [s.phase for s in result.steps.values()] == ["Succeeded"] * 3


def test_retries_then_failure_omits_dependents() -> None:
    attempts = {"flaky": 0, "broken": 0}

    def flaky(params: PublishParams) -> dict:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError("S3 hiccup")
        return {}

    def broken(params: PublishParams) -> dict:
        attempts["broken"] += 1
        raise OSError("disk full")

    def after(params: PublishParams) -> dict:
        raise AssertionError("must not run")

    spec = WorkflowSpec("w", (
        StepSpec("flaky", flaky, retries=3),
        StepSpec("broken", broken, depends=("flaky",), retries=1),
        StepSpec("after", after, depends=("broken",)),
    ))  # fmt: skip
    with pytest.raises(WorkflowFailed, match="broken: OSError: disk full") as failed:
        run_workflow(spec, PARAMS, console=quiet(), retry_backoff_s=0)
    steps = failed.value.result.steps
    assert (steps["flaky"].phase, steps["flaky"].attempts) == ("Succeeded", 3)
    assert (steps["broken"].phase, steps["broken"].attempts) == ("Failed", 2)
    assert steps["after"].phase == "Omitted"
    assert attempts == {"flaky": 3, "broken": 2}


def test_a_failed_gate_is_not_retried() -> None:
    attempts = []

    def gate(params: PublishParams) -> dict:
        attempts.append(1)
        raise StepFailed("accuracy 0.2 below 0.8")

    spec = WorkflowSpec("w", (StepSpec("gate", gate, retries=5),))
    result = run_workflow(spec, PARAMS, console=quiet(), raise_on_failure=False)
    assert result.phase == "Failed" and len(attempts) == 1


def test_publish_definition_is_a_valid_dag() -> None:
    spec = publish_workflow()
    names = [s.name for s in spec.order()]
    assert names == [
        "stage", "verify", "register", "deploy", "evaluate", "benchmark", "promote",
    ]  # fmt: skip
    for step in spec.steps:
        for source, _ in step.inputs.values():
            assert source in names[: names.index(step.name)]
    assert spec.step("promote").depends == ("evaluate", "benchmark")


def test_params_round_trip_and_reject_unknown_fields() -> None:
    params = PublishParams(name="m", source="s3://b/p/", slo_ttft_p95_ms=123.0)
    assert PublishParams.from_json(params.to_json()) == params
    with pytest.raises(ValueError, match="unknown publish parameter"):
        PublishParams.from_json('{"name": "m", "sorce": "s3://typo/"}')
