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


def test_exit_handler_runs_last_with_the_run_phase() -> None:
    seen: list[str] = []

    def ok(params: PublishParams) -> dict:
        return {}

    def boom(params: PublishParams) -> dict:
        raise StepFailed("gate refused")

    def on_exit(params: PublishParams, status: str) -> dict:
        seen.append(status)
        return {"removed": []}

    exit_spec = StepSpec("cleanup", on_exit, inputs={"status": ("workflow", "status")})
    good = WorkflowSpec("w", (StepSpec("a", ok),), on_exit=exit_spec)
    bad = WorkflowSpec("w", (StepSpec("a", boom), StepSpec("b", ok, depends=("a",))),
                       on_exit=exit_spec)  # fmt: skip
    assert run_workflow(good, PARAMS, console=quiet()).exit.phase == "Succeeded"
    result = run_workflow(bad, PARAMS, console=quiet(), raise_on_failure=False)
    assert seen == ["Succeeded", "Failed"]
    assert [result.steps["b"].phase, result.exit.phase] == ["Omitted", "Succeeded"]


def test_a_failing_exit_handler_fails_the_run() -> None:
    def ok(params: PublishParams) -> dict:
        return {}

    def on_exit(params: PublishParams, status: str) -> dict:
        raise OSError("cannot reach the cluster")

    spec = WorkflowSpec("w", (StepSpec("a", ok),),
                        on_exit=StepSpec("cleanup", on_exit, retries=1))  # fmt: skip
    with pytest.raises(WorkflowFailed, match="cleanup: OSError"):
        run_workflow(spec, PARAMS, console=quiet(), retry_backoff_s=0)


def test_registry_outages_are_retried_refusals_are_not() -> None:
    from workflows.steps.registry import RegistryError, RegistryUnavailable

    attempts = {"outage": 0, "refused": 0}

    def outage(params: PublishParams) -> dict:
        attempts["outage"] += 1
        if attempts["outage"] < 3:
            raise RegistryUnavailable("registering: connection refused")
        return {}

    def refused(params: PublishParams) -> dict:
        attempts["refused"] += 1
        raise RegistryError("version 3 is not promoted: eval_passed=false")

    spec = WorkflowSpec("w", (StepSpec("outage", outage, retries=3),
                              StepSpec("refused", refused, retries=3)))  # fmt: skip
    run_workflow(spec, PARAMS, console=quiet(), retry_backoff_s=0, raise_on_failure=False)
    assert attempts == {"outage": 3, "refused": 1}


def stage_deploy_evaluate(calls: list[str], failures: dict[str, BaseException]) -> WorkflowSpec:
    """stage -> deploy -> evaluate, and an exit handler that undoes deploy unless the run
    succeeded. Each step and the handler append their name to ``calls``; a step raises its
    entry of ``failures`` the first time it runs."""

    def step(name: str):  # type: ignore[no-untyped-def]
        def fn(params: PublishParams, **inputs: object) -> dict:
            calls.append(name)
            if name in failures:
                raise failures.pop(name)
            return {"out": name}

        return fn

    def on_exit(params: PublishParams, status: str) -> dict:
        calls.append(f"exit:{status}")
        return {"undone": ["deploy"] if status != "Succeeded" else []}

    return WorkflowSpec("w", (
        StepSpec("stage", step("stage")),
        StepSpec("deploy", step("deploy"), depends=("stage",)),
        StepSpec("evaluate", step("evaluate"), depends=("deploy",)),
    ), on_exit=StepSpec("cleanup", on_exit))  # fmt: skip


def test_resume_reuses_what_succeeded_except_what_the_exit_handler_undid(tmp_path) -> None:
    calls: list[str] = []
    spec = stage_deploy_evaluate(calls, {"evaluate": ConnectionError("candidate unreachable")})
    first = run_workflow(spec, PARAMS, console=quiet(), state_dir=tmp_path, raise_on_failure=False)
    assert first.phase == "Failed" and first.run_id.startswith("local-")
    assert (tmp_path / f"{first.run_id}.json").is_file()
    from workflows.local_runner import load_params

    params = load_params(tmp_path, first.run_id)
    assert params.run_id == first.run_id and params.name == "m"
    second = run_workflow(spec, params, console=quiet(), state_dir=tmp_path, resume=True)
    assert second.succeeded and second.run_id == first.run_id
    assert calls == ["stage", "deploy", "evaluate", "exit:Failed",
                     "deploy", "evaluate", "exit:Succeeded"]  # fmt: skip
    assert [second.steps[s].reused for s in ("stage", "deploy", "evaluate")] == [True, False, False]


def test_local_gate_holds_on_a_busy_laptop_the_cluster_keeps_its_slo() -> None:
    """A CPU-only laptop under load (here: TTFT p95 20 s, ITL p95 0.9 s) passes the local gate;
    the same figures fail the cluster's SLO; explicit values win on both."""
    from workflows.pipeline import CLUSTER_SLO_MS, LOCAL_SLO_MS
    from workflows.steps.benchmark import BenchReport, check_slo

    busy = BenchReport(num_requests=16, concurrency=4, ttft_p50_ms=9000.0, ttft_p95_ms=20000.0,
                       itl_p50_ms=200.0, itl_p95_ms=900.0, output_tokens_per_s=3.0,
                       duration_s=60.0)  # fmt: skip
    local = PublishParams(name="m")
    cluster = PublishParams(name="m", deploy_target="kubernetes")
    assert local.slo_ms() == LOCAL_SLO_MS and cluster.slo_ms() == CLUSTER_SLO_MS
    assert check_slo(busy, *local.slo_ms()).passed
    assert check_slo(busy, *cluster.slo_ms()).violations == [
        "TTFT p95 20000.0 ms > SLO 5000.0 ms", "ITL p95 900.0 ms > SLO 500.0 ms",
    ]  # fmt: skip
    assert PublishParams(name="m", slo_ttft_p95_ms=100.0).slo_ms() == (100.0, LOCAL_SLO_MS[1])


def test_an_interrupted_run_still_runs_the_exit_handler_and_resumes(tmp_path) -> None:
    """Ctrl-C (or SIGTERM turned into SystemExit, as `strata demo` does) in the middle of a
    step: the exit handler runs with "Failed" before the interruption goes on, and its result is
    saved, so a resume deploys again instead of reusing the removed deployment."""
    seen: list[str] = []
    spec = stage_deploy_evaluate(seen, {"evaluate": KeyboardInterrupt()})
    params = PublishParams(name="m", run_id="local-interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_workflow(spec, params, console=quiet(), state_dir=tmp_path)
    assert seen == ["stage", "deploy", "evaluate", "exit:Failed"]
    resumed = run_workflow(spec, params, console=quiet(), state_dir=tmp_path, resume=True)
    assert resumed.succeeded
    assert seen[4:] == ["deploy", "evaluate", "exit:Succeeded"]
    reused = [resumed.steps[s].reused for s in ("stage", "deploy", "evaluate")]
    assert reused == [True, False, False]
