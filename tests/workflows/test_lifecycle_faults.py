"""The publish workflow under faults, against real services: moto's S3 and an MLflow server
(SQLite) behind fault-injecting proxies (``tests/workflows/fault_proxy.py``), the MLflow server
stopped and restarted mid-publish, and real candidate worker processes (mock engine).

For each fault: the run's outcome, the registry afterwards (every version complete, one per
publish run, aliases consistent, nothing registered from a half-staged copy), and a publish
that completes once the fault clears. The exit handler removes a candidate that a run did not
promote (failed gate, failed step): its worker process is gone.

``STRATA_FAULT_REPORT=path.json`` writes one row per scenario (the figures in the closing note).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from rich.console import Console

from tests.workflows.conftest import LocalStack
from tests.workflows.fault_proxy import FaultProxy, FaultRule
from workflows.local_runner import RunResult, load_params, run_workflow
from workflows.local_services import start_local_services, stop_local_service
from workflows.pipeline import PublishParams, WorkflowSpec, publish_workflow
from workflows.steps import registry
from workflows.steps.manifest import read_manifest
from workflows.steps.s3 import upload_dir

pytestmark = pytest.mark.slow

SOURCE = "s3://models/tiny/"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
REPORT: list[dict[str, Any]] = []


@dataclass
class Stack:
    root: Path
    s3_port: int
    mlflow_port: int
    s3: FaultProxy  # in front of moto
    mlflow: FaultProxy  # in front of the MLflow server

    def restart_mlflow(self) -> None:
        start_local_services(
            self.root, s3_port=self.s3_port, mlflow_port=self.mlflow_port,
            with_prometheus=False, startup_timeout_s=300,
        )  # fmt: skip

    def stop_mlflow(self) -> None:
        stop_local_service(self.root, "mlflow")


@pytest.fixture(scope="module")
def stack(local_stack: LocalStack, tiny_model_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # fmt: skip
    """The session's S3 and MLflow (``local_stack``, shared with test_registry.py: the models
    here have their own names) behind fault proxies, and the tiny model uploaded to SOURCE."""
    with pytest.MonkeyPatch.context() as env:
        # Fail fast at the HTTP layer, so the workflow's own retries are what is tested.
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        model = tmp_path_factory.mktemp("model") / "tiny"
        shutil.copytree(tiny_model_dir, model)
        (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        upload_dir(model, SOURCE, endpoint_url=local_stack.s3_url, create_bucket=True)
        s3, mlflow = FaultProxy(local_stack.s3_url), FaultProxy(local_stack.mlflow_url)
        stack = Stack(local_stack.root, local_stack.s3_port, local_stack.mlflow_port, s3, mlflow)
        try:
            yield stack
        finally:
            s3.stop()
            mlflow.stop()
            # MLflow up again for the session's other users, should a test have failed between
            # stopping and restarting it (a no-op when it runs).
            stack.restart_mlflow()
    if os.environ.get("STRATA_FAULT_REPORT"):
        Path(os.environ["STRATA_FAULT_REPORT"]).write_text(json.dumps(REPORT, indent=2))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack: Stack) -> Iterator[Path]:
    """Each test's deployments land under its own ``.strata/deployments``."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    stack.s3.clear()
    stack.mlflow.clear()
    from workflows.steps.deploy import list_deployments, stop_deployment

    for deployment in list_deployments():
        stop_deployment(deployment, timeout_s=10)


def make_params(stack: Stack, name: str, workdir: Path, **overrides: Any) -> PublishParams:
    fields: dict[str, Any] = {
        "name": name,
        "source": SOURCE,
        "cache_dir": str(workdir / "cache"),
        "s3_endpoint_url": stack.s3.url,
        "mlflow_tracking_uri": stack.mlflow.url,
        "engine": "mock",
        "eval_min_accuracy": 0.0,  # the mock engine answers no question right
        "bench_num_requests": 4,
        "bench_concurrency": 2,
        "bench_max_tokens": 8,
    }
    return PublishParams(**(fields | overrides))


def run(spec: WorkflowSpec, params: PublishParams, workdir: Path, **kw: Any) -> RunResult:
    return run_workflow(
        spec, params, console=Console(file=io.StringIO(), width=200), raise_on_failure=False,
        retry_backoff_s=0.2, state_dir=workdir / "runs", **kw,
    )  # fmt: skip


def through_register(**retries: int) -> WorkflowSpec:
    """stage -> verify -> register of the publish workflow (with other retries, if given)."""
    spec = publish_workflow()
    steps = tuple(
        dataclasses.replace(s, retries=retries.get(s.name, s.retries))
        for s in spec.steps
        if s.name in ("stage", "verify", "register")
    )
    return WorkflowSpec(spec.name, steps)


def registry_state(url: str, name: str) -> dict[str, Any]:
    """Checks the registry's invariants for ``name`` and returns what the table reports."""
    client = registry.make_client(url)
    try:
        model = client.get_registered_model(name)
    except Exception:  # not registered at all
        return {"versions": 0, "aliases": {}}
    versions = registry.list_versions(url, name)
    runs = [v.tags.get(registry.PUBLISH_RUN_TAG) for v in versions]
    assert len(runs) == len(set(runs)), f"two versions of one publish run: {runs}"
    for info in versions:
        for tag in ("source_uri", "manifest_digest", "staged_dir", "engine_config"):
            assert info.tags.get(tag), f"version {info.version} lacks tag {tag}"
        assert client.get_run(info.run_id).info.status == "FINISHED"
        # Registered only from a complete staged copy: its manifest is the one registered.
        assert read_manifest(Path(info.staged_dir)).digest == info.manifest_digest
    aliases = {a: str(v) for a, v in model.aliases.items()}
    known = {v.version: v for v in versions}
    assert set(aliases.values()) <= set(known), aliases
    production = aliases.get(registry.PRODUCTION)
    if production is not None:
        tags = known[production].tags
        assert tags.get("eval_passed") == tags.get("benchmark_passed") == "true"
        assert aliases.get(registry.PREVIOUS) != production
        assert aliases.get(registry.CANDIDATE) != production
    return {"versions": len(versions), "aliases": aliases}


def report(scenario: str, result: RunResult, state: dict[str, Any], **figures: Any) -> None:
    attempts = {n: s.attempts for n, s in result.steps.items() if s.attempts > 1}
    REPORT.append({
        "scenario": scenario, "outcome": result.phase, "retried": attempts,
        "duration_s": round(result.duration_s, 1), "registry": state, **figures,
    })  # fmt: skip


def gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)  # poll until the deadline
    return False


def noting_pids(spec: WorkflowSpec, pids: list[int]) -> WorkflowSpec:
    """``spec`` whose deploy step also notes the candidate's worker pids."""
    deploy = spec.step("deploy")

    def deploy_and_note(params: PublishParams, **inputs: Any) -> dict[str, Any]:
        out = deploy.fn(params, **inputs)
        record = Path(".strata/deployments", out["deployment"], "deployment.json")
        pids.extend(json.loads(record.read_text())["pids"])
        return out

    steps = tuple(
        dataclasses.replace(s, fn=deploy_and_note) if s.name == "deploy" else s for s in spec.steps
    )
    return WorkflowSpec(spec.name, steps, spec.on_exit)


# --- the exit handler ----------------------------------------------------------------------


def test_failed_gate_removes_the_candidate_and_its_worker_exits(
    stack: Stack, workdir: Path
) -> None:
    params = make_params(stack, "gate", workdir, eval_min_accuracy=1.0)
    pids: list[int] = []
    result = run(noting_pids(publish_workflow(), pids), params, workdir)
    assert result.phase == "Failed"
    assert result.steps["promote"].phase == "Failed"
    assert "evaluate failed" in result.steps["promote"].message
    assert result.steps["promote"].attempts == 1  # a refused gate is not retried
    assert result.exit.phase == "Succeeded"
    assert result.exit.outputs["removed"] == ["gate-v1"]
    assert pids and all(gone(pid) for pid in pids), "the rejected candidate still runs"
    assert not (workdir / ".strata/deployments/gate-v1/deployment.json").exists()
    state = registry_state(stack.mlflow.url, "gate")
    assert state["aliases"] == {"candidate": "1"}  # registered, never production
    report("evaluation gate refused", result, state, candidate_removed=True)


def test_failed_step_removes_the_candidate_and_its_worker_exits(
    stack: Stack, workdir: Path
) -> None:
    params = make_params(stack, "broken", workdir, eval_set="no-such-set")
    pids: list[int] = []
    result = run(noting_pids(publish_workflow(), pids), params, workdir)
    assert result.phase == "Failed"
    assert result.steps["evaluate"].phase == "Failed"
    assert "eval set 'no-such-set' not found" in result.steps["evaluate"].message
    assert result.steps["evaluate"].attempts == 1  # a missing eval set is not retried
    assert result.steps["promote"].phase == "Omitted"
    assert result.exit.outputs["removed"] == ["broken-v1"]
    assert pids and all(gone(pid) for pid in pids), "the candidate worker still runs"
    state = registry_state(stack.mlflow.url, "broken")
    assert state["aliases"] == {"candidate": "1"}
    report("evaluate step failed", result, state, candidate_removed=True)


# --- S3 faults -----------------------------------------------------------------------------

WEIGHTS = r"/models/tiny/model\.safetensors"


def staged_bytes(result: RunResult) -> tuple[int, int]:
    out = result.outputs("stage")
    return out["downloaded_bytes"], out["total_bytes"]


@pytest.mark.parametrize(
    ("scenario", "rule"),
    [
        ("S3 503 SlowDown x2 on the weights",
         FaultRule("error", "GET", WEIGHTS, times=2, status=503, code="SlowDown")),
        ("S3 connection cut mid-object x2",
         FaultRule("cut", "GET", WEIGHTS, times=2, cut_after_bytes=1000)),
        ("S3 every response 0.3 s late",
         FaultRule("delay", "GET", r"/models/tiny/", delay_s=0.3)),
    ],
)  # fmt: skip
def test_transient_s3_faults_are_absorbed(
    stack: Stack, workdir: Path, scenario: str, rule: FaultRule
) -> None:
    name = "s3-" + rule.kind
    stack.s3.add(rule)
    result = run(through_register(), make_params(stack, name, workdir), workdir)
    assert result.phase == "Succeeded", result.steps["stage"].message
    assert rule.hits >= 2
    downloaded, total = staged_bytes(result)
    assert downloaded == total  # every byte arrived once the faults passed, checked by verify
    state = registry_state(stack.mlflow.url, name)
    assert state == {"versions": 1, "aliases": {"candidate": "1"}}
    report(scenario, result, state, faults_injected=rule.hits)


def test_s3_outage_fails_the_stage_then_resume_fetches_only_the_rest(
    stack: Stack, workdir: Path
) -> None:
    spec = through_register(stage=1)
    params = make_params(stack, "s3-outage", workdir)
    outage = stack.s3.add(FaultRule("error", "GET", WEIGHTS, status=500, code="InternalError"))
    failed = run(spec, params, workdir)
    assert failed.phase == "Failed"
    assert failed.steps["stage"].attempts == 2
    assert "InternalError" in failed.steps["stage"].message
    assert failed.steps["register"].phase == "Omitted"
    assert registry_state(stack.mlflow.url, "s3-outage") == {"versions": 0, "aliases": {}}
    assert not (workdir / "cache" / "s3-outage").exists()  # nothing half-published
    stack.s3.clear()
    resumed = run(spec, load_params(workdir / "runs", failed.run_id), workdir, resume=True)
    assert resumed.phase == "Succeeded" and resumed.run_id == failed.run_id
    downloaded, total = staged_bytes(resumed)
    weights = (workdir / "cache").glob("s3-outage-*/model.safetensors")
    assert downloaded == next(weights).stat().st_size < total  # only the missing file
    state = registry_state(stack.mlflow.url, "s3-outage")
    assert state == {"versions": 1, "aliases": {"candidate": "1"}}
    report("S3 500 on the weights, outlasting the retries", failed,
           {"versions": 0, "aliases": {}}, faults_injected=outage.hits,
           resumed="Succeeded", resumed_bytes=downloaded, total_bytes=total,
           registry_after_resume=state)  # fmt: skip


# --- MLflow faults -------------------------------------------------------------------------


def test_mlflow_stopped_mid_publish_and_restarted(stack: Stack, workdir: Path) -> None:
    """MLflow goes away after verify; register fails, MLflow comes back, the retry registers."""
    spec = through_register(register=2)
    verify = spec.step("verify")

    def verify_then_stop_mlflow(params: PublishParams, **inputs: Any) -> dict[str, Any]:
        out = verify.fn(params, **inputs)
        stack.stop_mlflow()
        return out

    spec = WorkflowSpec(spec.name, tuple(
        dataclasses.replace(s, fn=verify_then_stop_mlflow) if s.name == "verify" else s
        for s in spec.steps
    ))  # fmt: skip
    restarts: list[str] = []

    def restart(step: str, attempt: int, exc: Exception) -> None:
        if step == "register" and not restarts:
            restarts.append(f"{type(exc).__name__}: {exc}"[:200])
            stack.restart_mlflow()

    result = run(spec, make_params(stack, "mlflow-restart", workdir), workdir, on_retry=restart)
    assert result.phase == "Succeeded", result.steps["register"].message
    assert result.steps["register"].attempts == 2
    assert restarts and restarts[0].startswith("RegistryUnavailable")
    state = registry_state(stack.mlflow.url, "mlflow-restart")
    assert state == {"versions": 1, "aliases": {"candidate": "1"}}
    report("MLflow stopped after verify, restarted", result, state)


@pytest.mark.parametrize("client_retries", [0, 2])
def test_lost_response_after_version_created_registers_once(
    stack: Stack, workdir: Path, monkeypatch: pytest.MonkeyPatch, client_retries: int
) -> None:
    """MLflow commits the new version but the answer never arrives. Without client retries the
    register step's retry finds the version by its publish run; with them, the client's own
    re-POST makes a second version, which register deletes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(client_retries))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    name = f"mlflow-lost-{client_retries}"
    lost = stack.mlflow.add(FaultRule("drop", "POST", r"/model-versions/create$", times=1))
    later = stack.mlflow.add(FaultRule("delay", "POST", r"/model-versions/create$"))  # counts
    result = run(through_register(), make_params(stack, name, workdir), workdir)
    assert result.phase == "Succeeded", result.steps["register"].message
    assert lost.hits == 1
    creates = 1 + later.hits
    # The client's own retry sends the POST again (a second version, deleted); the step's
    # retry finds the first by its publish run and sends none.
    assert creates == (2 if client_retries else 1)
    state = registry_state(stack.mlflow.url, name)
    assert state == {"versions": 1, "aliases": {"candidate": "1"}}
    assert result.outputs("register")["version"] == "1"
    report(f"MLflow response lost after create-version (client retries {client_retries})",
           result, state, faults_injected=lost.hits, versions_created=creates,
           duplicates_deleted=creates - 1)  # fmt: skip


def test_promote_interrupted_between_alias_writes_ends_consistent(
    stack: Stack, workdir: Path
) -> None:
    """``previous`` is written, then setting ``production`` fails: the retried promote step
    finishes the move; no state in between names two productions or loses the old one."""
    from workflows.steps import lifecycle

    name = "promote-cut"
    url = stack.mlflow.url
    for n in (1, 2):  # two registered versions that passed their gates
        staged = workdir / "cache" / f"v{n}"
        staged.mkdir(parents=True)
        (staged / "weights").write_text(str(n))
        from workflows.steps.manifest import build_manifest, write_manifest

        manifest = build_manifest(staged)
        write_manifest(staged, manifest)
        version = registry.register_version(
            url, name, source_uri=SOURCE, staged_dir=str(staged),
            manifest_digest=manifest.digest, engine_config={}, publish_run=f"r{n}",
        ).version  # fmt: skip
        registry.log_version_metrics(
            url, name, version, {}, tags={"eval_passed": "true", "benchmark_passed": "true"}
        )
    registry.promote(url, name, "1")
    params = make_params(stack, name, workdir)

    def promote(p: PublishParams) -> dict[str, Any]:
        return lifecycle.promote_step(p, "2", True, True, endpoint="http://unused")

    from workflows.pipeline import StepSpec

    spec = WorkflowSpec("promote-only", (StepSpec("promote", promote, retries=2),))
    cut = stack.mlflow.add(FaultRule("error", "POST", r"/registered-models/alias$", after=1,
                                     times=1, status=503))  # fmt: skip
    result = run(spec, params, workdir)
    assert result.phase == "Succeeded" and result.steps["promote"].attempts == 2
    assert cut.hits == 1
    state = registry_state(url, name)
    assert state["aliases"] == {"production": "2", "previous": "1"}
    report("MLflow 503 between promote's alias writes", result, state, faults_injected=cut.hits)


def test_full_publish_completes_through_s3_and_mlflow_faults(stack: Stack, workdir: Path) -> None:
    """Every transient fault at once on one publish: it completes, promotes, keeps serving."""
    rules = [
        stack.s3.add(FaultRule("cut", "GET", WEIGHTS, times=1, cut_after_bytes=1000)),
        stack.s3.add(FaultRule("error", "GET", r"config\.json", times=1, status=503)),
        stack.mlflow.add(FaultRule("drop", "POST", r"/model-versions/create$", times=1)),
        stack.mlflow.add(FaultRule("error", "POST", r"/registered-models/alias$", after=1,
                                   times=1, status=503)),
    ]  # fmt: skip
    pids: list[int] = []
    params = make_params(stack, "full", workdir)
    result = run(noting_pids(publish_workflow(), pids), params, workdir)
    assert result.phase == "Succeeded", {n: s.message for n, s in result.steps.items()}
    assert all(r.hits == 1 for r in rules), [r.hits for r in rules]
    assert result.exit.outputs == {"removed": [], "reason": "promoted"}
    assert httpx.get(f"{result.outputs('deploy')['endpoint']}/health").status_code == 200
    state = registry_state(stack.mlflow.url, "full")
    assert state == {"versions": 1, "aliases": {"production": "1"}}
    report("all of the above at once, full publish", result, state,
           faults_injected=sum(r.hits for r in rules), candidate_kept=True)  # fmt: skip
