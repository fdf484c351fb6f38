"""The Argo side of "two runners, one definition": rendered WorkflowTemplates, submission, and
``strata step``.

Rendered YAML is validated against the JSON schema of Argo's own models as Hera ships them, in
strict mode (unknown fields rejected), and
an emulated Argo run walks the rendered DAG, substituting parameters the way the controller does,
and calls ``strata step`` for every task: the step functions see the same typed inputs as in the
local runner. Submission goes to a recording HTTP server that speaks Argo's API contract.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hera.workflows.models import WorkflowTemplate
from typer.testing import CliRunner

from tests import argo_schema
from workflows import argo, step_cli
from workflows.pipeline import WORKFLOWS as PIPELINE_WORKFLOWS
from workflows.pipeline import PublishParams, StepSpec, WorkflowSpec, publish_workflow
from workflows.publish_cli import publish
from workflows.steps import lifecycle

TASK_REF = re.compile(r"\{\{tasks\.([\w-]+)\.outputs\.parameters\.([\w-]+)\}\}")
WORKFLOW_REF = re.compile(r"\{\{workflow\.parameters\.([\w-]+)\}\}")
WORKFLOW_VAR = re.compile(r"\{\{workflow\.(uid|status)\}\}")
WORKFLOW_UID = "5d0c1a7e-8e0f-4c1b-9a55-2f1e3b8c9d10"
INPUT_REF = re.compile(r"\{\{inputs\.parameters\.([\w-]+)\}\}")
# Hera's WorkflowsService serialises requests with pydantic's deprecated ``.json()``.
pytestmark = pytest.mark.filterwarnings("ignore:The `json` method is deprecated")


# --- schema --------------------------------------------------------------------------------


def _load_definitions(strict: bool) -> dict[str, Any]:
    return argo_schema.definitions(strict)


@pytest.fixture(scope="module")
def strict_definitions() -> dict[str, Any]:
    return _load_definitions(strict=True)


schema_errors = argo_schema.schema_errors


# --- rendered templates --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("rendered")
    paths = argo.render_templates(out_dir)
    documents = {}
    for path in paths:
        (document,) = list(yaml.safe_load_all(path.read_text()))
        documents[document["metadata"]["name"]] = document
    return documents


def templates_by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in document["spec"]["templates"]}


def dag_tasks(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dag = templates_by_name(document)[document["spec"]["entrypoint"]]["dag"]
    return {t["name"]: t for t in dag["tasks"]}


def task_argument(task: dict[str, Any], name: str) -> str:
    (value,) = [p["value"] for p in task["arguments"]["parameters"] if p["name"] == name]
    return value


def specs() -> dict[str, WorkflowSpec]:
    return {name: make() for name, make in PIPELINE_WORKFLOWS.items()}


def test_render_writes_one_file_per_workflow(tmp_path: Path) -> None:
    paths = argo.render_templates(tmp_path / "out")
    assert sorted(p.name for p in paths) == ["publish-model.yaml", "rollback-model.yaml"]
    for path in paths:
        (document,) = list(yaml.safe_load_all(path.read_text()))
        assert document["apiVersion"] == "argoproj.io/v1alpha1"
        assert document["kind"] == "WorkflowTemplate"
        assert document["metadata"]["name"] == path.stem
        assert document["metadata"]["labels"] == {"app.kubernetes.io/part-of": "strata"}


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_rendered_template_passes_strict_argo_schema(
    rendered: dict[str, dict[str, Any]], strict_definitions: dict[str, Any], name: str
) -> None:
    assert schema_errors(strict_definitions, "WorkflowTemplate", rendered[name]) == []


def test_strict_schema_rejects_unknown_fields(
    rendered: dict[str, dict[str, Any]], strict_definitions: dict[str, Any]
) -> None:
    broken = copy.deepcopy(rendered["publish-model"])
    broken["spec"]["templates"][0]["container"]["imagePullPolcy"] = "Always"  # typo
    broken["spec"]["templates"][0]["retryStrategy"]["backof"] = {"duration": "1s"}  # typo
    errors = schema_errors(strict_definitions, "WorkflowTemplate", broken)
    assert len(errors) == 2
    assert any("imagePullPolcy" in e for e in errors)
    assert any("backof" in e for e in errors)
    # The same typos pass the schema as generated, which is why the tests use strict mode.
    assert schema_errors(_load_definitions(strict=False), "WorkflowTemplate", broken) == []


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_rendered_template_round_trips_through_argos_models(
    rendered: dict[str, dict[str, Any]], name: str
) -> None:
    """Parsed by Argo's models (Hera's copy), nothing is dropped or changed on the way back."""
    parsed = WorkflowTemplate.model_validate(rendered[name])
    assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json") == rendered[name]


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_dag_matches_the_spec(rendered: dict[str, dict[str, Any]], name: str) -> None:
    spec = specs()[name]
    tasks = dag_tasks(rendered[name])
    assert list(tasks) == [s.name for s in spec.steps]
    for step in spec.steps:
        assert tasks[step.name]["template"] == step.name
        assert tasks[step.name].get("dependencies", []) == list(step.depends)


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_retries_match_the_spec(rendered: dict[str, dict[str, Any]], name: str) -> None:
    templates = templates_by_name(rendered[name])
    for step in specs()[name].steps:
        retry = templates[step.name].get("retryStrategy")
        if step.retries == 0:
            assert retry is None, step.name
        else:
            assert retry["limit"] == step.retries
            assert retry["retryPolicy"] == "Always"
            assert retry["backoff"] == {"duration": "10s", "factor": 2, "maxDuration": "5m"}
            # A step that exits "permanent failure" (a refused gate) is not retried.
            assert retry["expression"] == (
                'lastRetry.status == "Error" || asInt(lastRetry.exitCode) != 3'
            )


def test_publish_has_an_exit_handler_that_gets_the_run_status(
    rendered: dict[str, dict[str, Any]],
) -> None:
    publish, rollback = rendered["publish-model"], rendered["rollback-model"]
    assert "onExit" not in rollback["spec"]
    templates = templates_by_name(publish)
    handler = templates[publish["spec"]["onExit"]]
    (task,) = handler["dag"]["tasks"]
    assert task["template"] == "cleanup"
    assert templates["cleanup"]["container"]["args"][:4] == [
        "step", "cleanup", "--workflow", "publish-model",
    ]  # fmt: skip
    assert json.loads(task_argument(task, "inputs").replace("{{workflow.status}}", "Failed")) == {
        "status": "Failed"
    }
    params = task_argument(task, "params")
    assert params == task_argument(dag_tasks(publish)["deploy"], "params")
    assert '"run_id": "{{workflow.uid}}"' in params
    assert templates["cleanup"]["retryStrategy"]["limit"] == 2
    assert "cleanup" not in dag_tasks(publish)  # not part of the DAG: it runs after it


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_model_cache_pvc_mounted_exactly_where_needed(
    rendered: dict[str, dict[str, Any]], name: str
) -> None:
    templates = templates_by_name(rendered[name])
    for step in specs()[name].steps:
        template = templates[step.name]
        mounts = template["container"].get("volumeMounts", [])
        volumes = template.get("volumes", [])
        if step.needs_model_cache:
            assert mounts == [{"name": "model-cache", "mountPath": "/model-cache"}]
            assert volumes == [
                {
                    "name": "model-cache",
                    "persistentVolumeClaim": {
                        "claimName": "{{workflow.parameters.model-cache-pvc}}"
                    },
                }
            ]
        else:
            assert mounts == [] and volumes == [], step.name
    assert sorted(s.name for s in specs()["publish-model"].steps if s.needs_model_cache) == [
        "deploy",
        "stage",
        "verify",
    ]


def ancestors(tasks: dict[str, dict[str, Any]], name: str) -> set[str]:
    """Tasks that finish before ``name`` starts, following the rendered dependencies."""
    found: set[str] = set()
    stack = list(tasks[name].get("dependencies", []))
    while stack:
        dep = stack.pop()
        if dep not in found:
            found.add(dep)
            stack.extend(tasks[dep].get("dependencies", []))
    return found


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_task_output_references_resolve(rendered: dict[str, dict[str, Any]], name: str) -> None:
    spec = specs()[name]
    document = rendered[name]
    tasks = dag_tasks(document)
    templates = templates_by_name(document)
    num_refs = 0
    for task_name, task in tasks.items():
        for param in task["arguments"]["parameters"]:
            for src, key in TASK_REF.findall(param["value"]):
                num_refs += 1
                assert src in tasks, f"{task_name} reads unknown task {src}"
                assert src in ancestors(tasks, task_name), f"{task_name} reads {src} before it ran"
                declared = [p["name"] for p in templates[src]["outputs"]["parameters"]]
                assert key in declared, f"{task_name} reads {src}.{key}; {src} declares {declared}"
                assert f"/tmp/outputs/{key}" in {
                    p["valueFrom"]["path"] for p in templates[src]["outputs"]["parameters"]
                }
    assert num_refs == sum(len(s.inputs) for s in spec.steps)


@pytest.mark.parametrize("name", ["publish-model", "rollback-model"])
def test_parameters_declared_and_labelled(rendered: dict[str, dict[str, Any]], name: str) -> None:
    document = rendered[name]
    declared = {p["name"]: p for p in document["spec"]["arguments"]["parameters"]}
    used = set(WORKFLOW_REF.findall(json.dumps(document["spec"]["templates"])))
    assert used == set(declared)
    assert {"name", "image", "service-account", "mlflow-tracking-uri"} <= set(declared)
    assert "value" not in declared["name"]  # required at submission
    assert declared["image"]["value"] == "ghcr.io/strata-llm/strata:latest"
    if name == "publish-model":
        assert {"source", "slo-ttft-p95-ms", "slo-itl-p95-ms", "eval-min-accuracy"} <= set(declared)
        assert {"model-cache-pvc", "s3-endpoint-url"} <= set(declared)
        assert "value" not in declared["source"]
    assert document["spec"]["workflowMetadata"]["labels"] == {"app.kubernetes.io/part-of": "strata"}
    for step in specs()[name].steps:
        template = templates_by_name(document)[step.name]
        assert template["serviceAccountName"] == "{{workflow.parameters.service-account}}"
        assert template["container"]["image"] == "{{workflow.parameters.image}}"
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "strata"
        assert template["container"]["command"] == ["strata"]
        assert template["container"]["args"][:4] == ["step", step.name, "--workflow", name]


# --- an emulated Argo run over the rendered YAML -------------------------------------------


def substitute(text: str, pattern: re.Pattern[str], values: dict[Any, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.groups() if len(match.groups()) > 1 else match.group(1)
        return values[key]

    return pattern.sub(replace, text)


def step_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(step_cli.step)
    return app


def emulate_argo_run(
    document: dict[str, Any], arguments: dict[str, str], work_dir: Path
) -> dict[str, Any]:
    """Run the DAG the way the controller wires it: parameters in, output files back, then
    the ``onExit`` handler with ``{{workflow.status}}``.

    Returns each task's exit code and output parameters. A task runs once its dependencies
    succeed; ``strata step`` is invoked with the container's args after Argo's substitutions.
    """
    workflow_params = {
        p["name"]: p.get("value") for p in document["spec"]["arguments"]["parameters"]
    }
    workflow_params.update(arguments)
    templates = templates_by_name(document)
    outputs: dict[tuple[str, str], str] = {}
    results: dict[str, Any] = {}
    workflow_vars = {"uid": WORKFLOW_UID}
    tasks = list(dag_tasks(document).items())
    if "onExit" in document["spec"]:
        (exit_task,) = templates[document["spec"]["onExit"]]["dag"]["tasks"]
        tasks.append((exit_task["name"], exit_task))
    for name, task in tasks:
        if any(results.get(dep, {}).get("exit_code") != 0 for dep in task.get("dependencies", [])):
            continue  # Argo skips a task whose dependency failed
        if name == tasks[-1][0] and "onExit" in document["spec"]:
            ran_all = len(results) == len(tasks) - 1
            ok = ran_all and all(r["exit_code"] == 0 for r in results.values())
            workflow_vars["status"] = "Succeeded" if ok else "Failed"
        task_args = {
            p["name"]: substitute(
                substitute(
                    substitute(p["value"], WORKFLOW_REF, workflow_params),
                    WORKFLOW_VAR,
                    workflow_vars,
                ),
                TASK_REF,
                outputs,
            )
            for p in task["arguments"]["parameters"]
        }
        template = templates[task["template"]]
        container_args = [
            substitute(a, INPUT_REF, task_args) for a in template["container"]["args"]
        ]
        out_dir = work_dir / name
        container_args = [str(out_dir) if a == "/tmp/outputs" else a for a in container_args]
        result = CliRunner().invoke(step_app(), container_args[1:])  # drop the "step" subcommand
        results[name] = {"exit_code": result.exit_code, "output": result.output}
        if result.exit_code == 0:
            for param in template["outputs"]["parameters"]:
                path = Path(param["valueFrom"]["path"].replace("/tmp/outputs", str(out_dir)))
                outputs[(name, param["name"])] = path.read_text()
                results[name].setdefault("outputs", {})[param["name"]] = path.read_text()
    return results


@dataclass
class FakeSteps:
    """Stand-ins for the lifecycle step functions; record what each received."""

    evaluate_passed: bool = True
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def record(name: str, result: dict[str, Any]):  # type: ignore[no-untyped-def]
            def fn(params: PublishParams, **inputs: Any) -> dict[str, Any]:
                self.calls[name] = {"params": params, **inputs}
                if name == "promote" and not inputs["evaluate_passed"]:
                    raise lifecycle.StepFailed("version 3 of m not promoted: evaluate failed")
                return result

            return fn

        fakes = {
            "stage": {"staged_dir": "/model-cache/m-abc", "manifest_digest": "d1"},
            "verify": {"manifest_digest": "d1", "architecture": "LlamaForCausalLM"},
            "register": {"version": "3", "run_id": "r1"},
            "deploy": {"endpoint": "http://m-3.strata:8000/v1", "deployment": "m-3"},
            "evaluate": {"passed": self.evaluate_passed, "accuracy": 0.9, "failures": []},
            "benchmark": {"passed": True, "violations": [], "ttft_p95_ms": 12.5},
            "promote": {"production": "3", "previous": "2"},
            "rollback": {"production": "2", "previous": "3"},
            "cleanup": {"removed": [], "reason": "promoted", "undone": []},
        }  # fmt: skip
        for name, result in fakes.items():
            monkeypatch.setattr(lifecycle, f"{name}_step", record(name, result))


def test_emulated_argo_run_calls_every_step_with_typed_inputs(
    rendered: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fakes = FakeSteps()
    fakes.install(monkeypatch)
    results = emulate_argo_run(
        rendered["publish-model"],
        {"source": "s3://models/m/", "name": "m", "slo-ttft-p95-ms": "250"},
        tmp_path,
    )
    assert {n: r["exit_code"] for n, r in results.items()} == dict.fromkeys(
        [*(s.name for s in publish_workflow().steps), "cleanup"], 0
    )
    assert fakes.calls["cleanup"]["status"] == "Succeeded"
    params = fakes.calls["stage"]["params"]
    assert params == PublishParams(
        name="m",
        source="s3://models/m/",
        cache_dir="/model-cache",
        deploy_target="kubernetes",
        mlflow_tracking_uri="http://mlflow.mlflow.svc.cluster.local:5000",
        s3_endpoint_url=None,
        frontend_url=None,
        slo_ttft_p95_ms=250,
        slo_itl_p95_ms=500.0,  # the template's default: the cluster's SLO
        run_id=WORKFLOW_UID,
    )
    assert all(call["params"] == params for call in fakes.calls.values())
    assert {k: v for k, v in fakes.calls["register"].items() if k != "params"} == {
        "staged_dir": "/model-cache/m-abc",
        "manifest_digest": "d1",
    }
    assert {k: v for k, v in fakes.calls["promote"].items() if k != "params"} == {
        "version": "3",
        "evaluate_passed": True,  # a JSON bool, not the string "true"
        "benchmark_passed": True,
        "endpoint": "http://m-3.strata:8000/v1",
    }
    assert json.loads(results["benchmark"]["outputs"]["result"])["ttft_p95_ms"] == 12.5


def test_emulated_argo_run_stops_at_a_failed_gate(
    rendered: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fakes = FakeSteps(evaluate_passed=False)
    fakes.install(monkeypatch)
    results = emulate_argo_run(
        rendered["publish-model"], {"source": "s3://models/m/", "name": "m"}, tmp_path
    )
    assert results["promote"]["exit_code"] == step_cli.PERMANENT_FAILURE_EXIT_CODE
    assert "not promoted: evaluate failed" in results["promote"]["output"]
    assert not (tmp_path / "promote" / "result.json").exists()
    # The exit handler still runs, told the run failed: it removes the candidate.
    assert results["cleanup"]["exit_code"] == 0
    assert fakes.calls["cleanup"]["status"] == "Failed"


def test_emulated_rollback_run(
    rendered: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fakes = FakeSteps()
    fakes.install(monkeypatch)
    results = emulate_argo_run(
        rendered["rollback-model"], {"name": "m", "frontend-url": "http://fe:8000"}, tmp_path
    )
    assert results["rollback"]["exit_code"] == 0
    assert fakes.calls["rollback"]["params"].frontend_url == "http://fe:8000"
    assert json.loads(results["rollback"]["outputs"]["result"]) == {
        "production": "2",
        "previous": "3",
    }


# --- strata step ---------------------------------------------------------------------------


@pytest.fixture
def fake_workflow(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def produce(params: PublishParams, size: int) -> dict[str, Any]:
        calls.append({"params": params, "size": size})
        return {"path": "/cache/x", "ok": True, "size": size * 2, "tags": ["a"]}

    def explode(params: PublishParams) -> dict[str, Any]:
        raise lifecycle.StepFailed("checksum mismatch in model.safetensors")

    def flaky(params: PublishParams) -> dict[str, Any]:
        raise ConnectionError("S3 hiccup")

    spec = WorkflowSpec(
        name="fake",
        steps=(
            StepSpec("source", explode),
            StepSpec("flaky", flaky),
            StepSpec("produce", produce, depends=("source",), inputs={"size": ("source", "n")}),
        ),
    )
    monkeypatch.setattr(step_cli, "WORKFLOWS", {"fake": lambda: spec})
    return calls


def test_step_writes_one_json_file_per_output(
    fake_workflow: list[dict[str, Any]], tmp_path: Path
) -> None:
    params = PublishParams(name="m", source="s3://b/m/").to_json()
    params = params.replace('"s3_endpoint_url": null', '"s3_endpoint_url": ""')
    result = CliRunner().invoke(
        step_app(),
        ["produce", "--params", params, "--inputs", '{"size": 21}', "--outputs-dir", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert fake_workflow == [{"params": PublishParams(name="m", source="s3://b/m/"), "size": 21}]
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert json.loads(files.pop("result.json")) == {
        "path": "/cache/x",
        "ok": True,
        "size": 42,
        "tags": ["a"],
    }
    assert files == {"path": '"/cache/x"', "ok": "true", "size": "42", "tags": '["a"]'}


PERMANENT = step_cli.PERMANENT_FAILURE_EXIT_CODE


@pytest.mark.parametrize(
    ("args", "message", "exit_code"),
    [
        (["source"], "StepFailed: checksum mismatch in model.safetensors", PERMANENT),
        (["nope"], "no step named 'nope'", PERMANENT),
        (["source", "--workflow", "other"], "unknown workflow 'other'", PERMANENT),
        (["produce", "--inputs", "{}"], "missing ['size']", PERMANENT),
        (["produce", "--inputs", "{bad"], "--inputs is not valid JSON", PERMANENT),
        (["flaky"], "ConnectionError: S3 hiccup", 1),
    ],
)
def test_step_failures_exit_with_the_cause_and_whether_to_retry(
    fake_workflow: list[dict[str, Any]],
    tmp_path: Path,
    args: list[str],
    message: str,
    exit_code: int,
) -> None:
    """Exit status 1: another attempt may succeed (Argo retries it); 3: it cannot."""
    params = PublishParams(name="m").to_json()
    result = CliRunner().invoke(
        step_app(), [*args, "--params", params, "--outputs-dir", str(tmp_path / "out")]
    )
    assert result.exit_code == exit_code
    assert message in result.output
    assert not (tmp_path / "out" / "result.json").exists()


def test_step_rejects_unknown_params(fake_workflow: list[dict[str, Any]], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        step_app(),
        ["source", "--params", '{"name": "m", "colour": "red"}', "--outputs-dir", str(tmp_path)],
    )
    assert result.exit_code == PERMANENT
    assert "unknown publish parameter(s): colour" in result.output


# --- submission: a recording server with Argo's API contract -------------------------------


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class RecordingArgoServer:
    """``POST /api/v1/workflows/{namespace}`` as argo-server answers it; records every request.

    The body is a ``WorkflowCreateRequest`` (``{"namespace", "workflow"}``); the answer is the
    created Workflow with ``metadata.name`` generated from ``generateName``. ``status`` forces
    an error answer (Argo's ``{"code", "message"}`` shape).
    """

    def __init__(self, prefix: str = "", status: int = 200) -> None:
        self.requests: list[RecordedRequest] = []
        self.prefix = prefix
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                server.requests.append(
                    RecordedRequest("POST", self.path, dict(self.headers.items()), body)
                )
                route = rf"{re.escape(server.prefix)}/api/v1/workflows/([\w-]+)"
                match = re.fullmatch(route, self.path)
                if match is None:
                    return self._answer(404, {"code": 5, "message": f"no route {self.path}"})
                if server.status != 200:
                    return self._answer(server.status, {"code": 7, "message": "permission denied"})
                workflow = dict(body["workflow"])
                meta = dict(workflow["metadata"])
                meta.update(
                    name=meta.pop("generateName") + "x7k2p",
                    namespace=match.group(1),
                    uid="5f0c2f7e-1111-2222-3333-444455556666",
                    creationTimestamp="2026-11-20T10:00:00Z",
                )
                self._answer(200, {**workflow, "metadata": meta})

            def _answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingArgoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def argo_server() -> Iterator[RecordingArgoServer]:
    with RecordingArgoServer() as server:
        yield server


def test_submit_creates_a_workflow_from_the_template(
    argo_server: RecordingArgoServer, strict_definitions: dict[str, Any]
) -> None:
    params = PublishParams(
        name="m", source="s3://models/m/", slo_ttft_p95_ms=250.0, s3_endpoint_url="http://s3:9000"
    )
    name = argo.submit(
        "publish-model",
        params,
        argo_server.url,
        "strata",
        token="tok-123",
        extra={"image": "registry/strata:1.2"},
    )
    assert name == "publish-model-x7k2p"
    (request,) = argo_server.requests
    assert (request.method, request.path) == ("POST", "/api/v1/workflows/strata")
    assert request.headers["Authorization"] == "Bearer tok-123"
    assert request.headers["Content-Type"] == "application/json"
    assert schema_errors(strict_definitions, "WorkflowCreateRequest", request.body) == []
    assert request.body["namespace"] == "strata"
    workflow = request.body["workflow"]
    assert workflow["apiVersion"] == "argoproj.io/v1alpha1" and workflow["kind"] == "Workflow"
    assert workflow["metadata"] == {
        "generateName": "publish-model-",
        "namespace": "strata",
        "labels": {"app.kubernetes.io/part-of": "strata"},
    }
    assert workflow["spec"] == {
        "workflowTemplateRef": {"name": "publish-model"},
        "arguments": {
            "parameters": [
                {"name": "source", "value": "s3://models/m/"},
                {"name": "name", "value": "m"},
                {"name": "slo-ttft-p95-ms", "value": "250.0"},
                {"name": "s3-endpoint-url", "value": "http://s3:9000"},
                {"name": "image", "value": "registry/strata:1.2"},
            ]
        },
    }


def test_submit_rollback_without_a_token_sends_no_auth_header(
    argo_server: RecordingArgoServer,
) -> None:
    argo.submit("rollback-model", PublishParams(name="m"), argo_server.url, "ml")
    (request,) = argo_server.requests
    assert request.path == "/api/v1/workflows/ml"
    assert "Authorization" not in request.headers
    assert request.body["workflow"]["spec"]["workflowTemplateRef"] == {"name": "rollback-model"}
    assert request.body["workflow"]["spec"]["arguments"] == {
        "parameters": [{"name": "name", "value": "m"}]
    }


def test_submit_keeps_a_path_prefix_on_the_server_url() -> None:
    with RecordingArgoServer(prefix="/argo") as server:
        argo.submit("rollback-model", PublishParams(name="m"), server.url, "ml")
    assert [r.path for r in server.requests] == ["/argo/api/v1/workflows/ml"]


def test_submit_reports_a_refusal() -> None:
    with (
        RecordingArgoServer(status=403) as server,
        pytest.raises(argo.SubmitError, match="permission denied"),
    ):
        argo.submit("rollback-model", PublishParams(name="m"), server.url, "ml", token="t")


def test_submit_checks_arguments_before_sending(argo_server: RecordingArgoServer) -> None:
    with pytest.raises(ValueError, match="parameter 'source'"):
        argo.submit("publish-model", PublishParams(name="m"), argo_server.url, "ml")
    with pytest.raises(ValueError, match="unknown parameter 'model-cache-pvc'"):
        argo.submit(
            "rollback-model", PublishParams(name="m"), argo_server.url, "ml",
            extra={"model-cache-pvc": "x"},
        )  # fmt: skip
    assert argo_server.requests == []


# --- strata publish -------------------------------------------------------------------------


def publish_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(publish)
    return app


def test_publish_render_writes_both_templates(tmp_path: Path) -> None:
    result = CliRunner().invoke(publish_app(), ["--render", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["publish-model.yaml", "rollback-model.yaml"]


def test_publish_submits_to_the_argo_server(argo_server: RecordingArgoServer) -> None:
    args = [
        "--source", "s3://models/m/", "--name", "m", "--argo-server", argo_server.url,
        "--namespace", "strata", "--token", "tok", "--eval-min-accuracy", "0.9",
        "--model-cache-pvc", "fsx-models",
    ]  # fmt: skip
    result = CliRunner().invoke(publish_app(), args, env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.output
    assert "submitted workflow strata/publish-model-x7k2p" in result.output
    (request,) = argo_server.requests
    assert request.headers["Authorization"] == "Bearer tok"
    assert request.body["workflow"]["spec"]["arguments"]["parameters"] == [
        {"name": "source", "value": "s3://models/m/"},
        {"name": "name", "value": "m"},
        {"name": "eval-min-accuracy", "value": "0.9"},
        {"name": "model-cache-pvc", "value": "fsx-models"},
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to do"),
        (["--local", "--argo-server", "http://a"], "pick one"),
        (["--argo-server", "http://a", "--name", "m"], "--source and --name"),
        (["--argo-server", "http://a", "--name", "m", "--source", "s3://b/m/"], "--namespace"),
        (["--resume", "local-1"], "--resume RUN_ID goes with --local alone"),
        (["--local", "--resume", "local-1", "--name", "m"], "goes with --local alone"),
        (["--local", "--resume", "local-no-such-run"], "no saved run 'local-no-such-run'"),
    ],
)
def test_publish_usage_errors(args: list[str], message: str) -> None:
    env = {"STRATA_ARGO_NAMESPACE": None, "MLFLOW_TRACKING_URI": None}
    result = CliRunner().invoke(publish_app(), args, env=env)
    assert result.exit_code == 1
    assert message in result.output


def test_publish_local_hands_the_spec_and_params_to_the_local_runner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from workflows import local_runner

    calls: list[tuple[WorkflowSpec, PublishParams]] = []
    monkeypatch.setattr(
        local_runner, "run_workflow", lambda spec, params, **kw: calls.append((spec, params))
    )
    args = ["--source", "s3://b/m/", "--name", "m", "--local", "--cache-dir", str(tmp_path)]
    result = CliRunner().invoke(publish_app(), args, env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.output
    ((spec, params),) = calls
    assert spec.name == "publish-model"
    assert params == PublishParams(name="m", source="s3://b/m/", cache_dir=str(tmp_path))
