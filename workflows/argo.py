"""Argo WorkflowTemplates built with Hera from the one definition in ``workflows/pipeline.py``.

Each ``StepSpec`` becomes a container template that runs ``strata step NAME`` (see
``workflows/step_cli.py``) and a DAG task with the step's dependencies and retries. Values
travel as JSON text, so the same function runs here and in the local runner:

    workflow parameters --(params JSON)--> task --> strata step --> /tmp/outputs/<key> (JSON)
                                                                       |
    {{tasks.<step>.outputs.parameters.<key>}} --(inputs JSON)--> downstream task

An output file holds a JSON-encoded value, so pasting it raw into the inputs JSON keeps it valid
(a string arrives with its quotes). Builds and submits only; it never runs a step itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydantic
import requests
from hera.exceptions import HeraException
from hera.workflows import (
    DAG,
    Container,
    Env,
    ExistingVolume,
    Parameter,
    Resources,
    RetryStrategy,
    Task,
    WorkflowsService,
    WorkflowTemplate,
)
from hera.workflows.models import (
    Arguments,
    Backoff,
    ObjectMeta,
    Toleration,
    ValueFrom,
    Workflow,
    WorkflowCreateRequest,
    WorkflowMetadata,
    WorkflowTemplateRef,
)
from hera.workflows.models import Parameter as ParameterModel
from hera.workflows.models import (
    WorkflowSpec as ArgoWorkflowSpec,
)

from workflows.pipeline import (
    CLUSTER_SLO_MS,
    WORKFLOW_STATUS,
    WORKFLOWS,
    PublishParams,
    StepSpec,
    WorkflowSpec,
)
from workflows.step_cli import PERMANENT_FAILURE_EXIT_CODE

DEFAULT_IMAGE = "ghcr.io/strata-llm/strata:latest"
OUTPUTS_DIR = "/tmp/outputs"
RESULT_FILE = "result.json"
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_MOUNT = "/model-cache"
ENTRYPOINT = "pipeline"
LABELS = {"app.kubernetes.io/part-of": "strata"}
# Backoff between retries of a step: 10 s, 20 s, 40 s, ... at most 5 minutes in all.
RETRY_BACKOFF = Backoff(duration="10s", factor=2, max_duration="5m")
# Retry what another attempt may cure: not a step that exited with strata step's "permanent
# failure" status (a refused gate, a failed check); always a pod that errored before its exit.
RETRY_EXPRESSION = (
    f'lastRetry.status == "Error" || asInt(lastRetry.exitCode) != {PERMANENT_FAILURE_EXIT_CODE}'
)
EXIT_TEMPLATE = "exit-handler"  # the onExit DAG: one task running the spec's exit step
# PublishParams fields that are fixed in a cluster rather than chosen per run.
CLUSTER_FIELDS = {"cache_dir": MODEL_CACHE_MOUNT, "deploy_target": "kubernetes"}


def _default(field: str) -> str:
    value = PublishParams.__dataclass_fields__[field].default
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class ArgoParam:
    """One workflow parameter and the ``PublishParams`` field it fills (None: Argo-only)."""

    name: str
    field: str | None
    default: str | None  # None: required at submission
    description: str
    number: bool = False  # pasted into the params JSON unquoted
    publish_only: bool = False


ARGO_PARAMS: tuple[ArgoParam, ...] = (
    ArgoParam(
        "source", "source", None, "S3 prefix of the weights, s3://bucket/prefix/", publish_only=True
    ),
    ArgoParam("name", "name", None, "registered model name"),
    ArgoParam(
        "slo-ttft-p95-ms",
        "slo_ttft_p95_ms",
        str(CLUSTER_SLO_MS[0]),
        "benchmark gate: p95 time to first token, ms",
        number=True,
        publish_only=True,
    ),
    ArgoParam(
        "slo-itl-p95-ms",
        "slo_itl_p95_ms",
        str(CLUSTER_SLO_MS[1]),
        "benchmark gate: p95 inter-token latency, ms",
        number=True,
        publish_only=True,
    ),
    ArgoParam(
        "eval-min-accuracy",
        "eval_min_accuracy",
        _default("eval_min_accuracy"),
        "evaluation gate: minimum accuracy, 0..1",
        number=True,
        publish_only=True,
    ),
    ArgoParam(
        "mlflow-tracking-uri",
        "mlflow_tracking_uri",
        "http://mlflow.mlflow.svc.cluster.local:5000",
        "MLflow tracking server",
    ),
    ArgoParam("s3-endpoint-url", "s3_endpoint_url", "", "S3 endpoint; empty: AWS S3"),
    ArgoParam(
        "frontend-url",
        "frontend_url",
        "",
        "frontend to switch to the promoted version; empty: none",
    ),
    ArgoParam(
        "serving-release",
        "release",
        "",
        "serving-chart release to move to the promoted version; empty: none",
    ),
    ArgoParam(
        "model-cache-pvc",
        None,
        "strata-model-cache",
        "existing PVC of the model cache (FSx for Lustre / EFS)",
        publish_only=True,
    ),
    ArgoParam("image", None, DEFAULT_IMAGE, "container image with the strata CLI"),
    ArgoParam("service-account", None, "strata-workflows", "service account of the step pods"),
)


def workflow_params(spec: WorkflowSpec) -> list[ArgoParam]:
    """The parameters of one workflow: all of them for publish, the shared ones otherwise."""
    publish = spec.name == "publish-model"
    params = [p for p in ARGO_PARAMS if publish or not p.publish_only]
    if any(s.needs_model_cache for s in spec.steps) and "model-cache-pvc" not in {
        p.name for p in params
    }:
        raise ValueError(f"{spec.name} mounts the model cache but has no model-cache-pvc parameter")
    return params


def params_json_template(spec: WorkflowSpec) -> str:
    """The ``PublishParams`` JSON with ``{{workflow.parameters.X}}`` placeholders.

    Strings are quoted, numbers are not; an empty string for a field whose default is None
    means None (``step_cli`` maps it back).
    """
    fields: dict[str, str] = {k: json.dumps(v) for k, v in CLUSTER_FIELDS.items()}
    fields["run_id"] = '"{{workflow.uid}}"'  # register is idempotent per run; `argo retry` keeps it
    for param in workflow_params(spec):
        if param.field is not None:
            ref = f"{{{{workflow.parameters.{param.name}}}}}"
            fields[param.field] = ref if param.number else f'"{ref}"'
    return "{" + ", ".join(f'"{k}": {v}' for k, v in sorted(fields.items())) + "}"


def inputs_json_template(step: StepSpec) -> str:
    """The step's keyword inputs as JSON built from upstream tasks' output parameters (and,
    for the exit handler, the workflow's status: a string, so quoted)."""
    parts = [
        f'"{kwarg}": "{{{{workflow.status}}}}"'
        if (src, key) == WORKFLOW_STATUS
        else f'"{kwarg}": {{{{tasks.{src}.outputs.parameters.{key}}}}}'
        for kwarg, (src, key) in sorted(step.inputs.items())
    ]
    return "{" + ", ".join(parts) + "}"


def output_keys(spec: WorkflowSpec, step_name: str) -> list[str]:
    """Output keys of ``step_name`` that downstream steps read (declared as Argo outputs)."""
    return sorted({key for s in spec.steps for src, key in s.inputs.values() if src == step_name})


def make_step_template(spec: WorkflowSpec, step: StepSpec) -> Container:
    """The container template of one step: ``strata step`` with params and inputs as JSON."""
    outputs = [
        Parameter(name=key, value_from=ValueFrom(path=f"{OUTPUTS_DIR}/{key}"))
        for key in output_keys(spec, step.name)
    ]
    outputs.append(
        Parameter(name="result", value_from=ValueFrom(path=f"{OUTPUTS_DIR}/{RESULT_FILE}"))
    )
    volumes = None
    if step.needs_model_cache:
        volumes = [
            ExistingVolume(
                name=MODEL_CACHE_VOLUME,
                claim_name="{{workflow.parameters.model-cache-pvc}}",
                mount_path=MODEL_CACHE_MOUNT,
            )
        ]
    retry = None
    if step.retries > 0:
        retry = RetryStrategy(
            limit=step.retries,
            retry_policy="Always",
            backoff=RETRY_BACKOFF,
            expression=RETRY_EXPRESSION,
        )
    gpu = step.needs_gpu
    # The deploy step's Kubernetes target reads these (workflows/steps/deploy.py): it deploys
    # into the workflow's namespace, with the workflow's image and model-cache PVC.
    env = [
        Env(name="STRATA_K8S_NAMESPACE", value="{{workflow.namespace}}"),
        Env(name="STRATA_IMAGE", value="{{workflow.parameters.image}}"),
    ]
    if "model-cache-pvc" in {p.name for p in workflow_params(spec)}:
        env.append(
            Env(name="STRATA_MODEL_CACHE_PVC", value="{{workflow.parameters.model-cache-pvc}}")
        )
    return Container(
        name=step.name,
        image="{{workflow.parameters.image}}",
        command=["strata"],
        args=[
            "step",
            step.name,
            "--workflow",
            spec.name,
            "--params",
            "{{inputs.parameters.params}}",
            "--inputs",
            "{{inputs.parameters.inputs}}",
            "--outputs-dir",
            OUTPUTS_DIR,
        ],
        inputs=[Parameter(name="params"), Parameter(name="inputs", value="{}")],
        outputs=outputs,
        volumes=volumes,
        env=env,
        retry_strategy=retry,
        service_account_name="{{workflow.parameters.service-account}}",
        labels={**LABELS, "app.kubernetes.io/component": step.name},
        resources=Resources(gpus=1) if gpu else None,
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
        if gpu
        else None,
    )


def build_workflow_template(
    spec: WorkflowSpec, defaults: Mapping[str, str] | None = None
) -> WorkflowTemplate:
    """One WorkflowTemplate: a container template per step and a DAG with the spec's edges.

    ``defaults`` replaces parameter defaults by Argo name (a cluster's image, PVC, service
    account, MLflow URL: ``platform/argo/``); a name the workflow lacks is ignored, so one
    mapping serves both workflows.
    """
    spec.order()  # raises on a step that depends on a later one
    unknown = set(defaults or {}) - {p.name for p in ARGO_PARAMS}
    if unknown:
        raise ValueError(f"unknown workflow parameters {sorted(unknown)}; known: "
                         f"{[p.name for p in ARGO_PARAMS]}")  # fmt: skip
    step_templates = {step.name: make_step_template(spec, step) for step in spec.steps}
    params_json = params_json_template(spec)
    tasks = [
        Task(
            name=step.name,
            template=step_templates[step.name],
            dependencies=list(step.depends) or None,
            arguments=[
                Parameter(name="params", value=params_json),
                Parameter(name="inputs", value=inputs_json_template(step)),
            ],
        )
        for step in spec.steps
    ]
    templates = [*step_templates.values(), DAG(name=ENTRYPOINT, tasks=tasks)]
    if spec.on_exit is not None:  # Argo's onExit: runs after the DAG whatever its outcome
        exit_step = make_step_template(spec, spec.on_exit)
        exit_task = Task(
            name=spec.on_exit.name,
            template=exit_step,
            arguments=[
                Parameter(name="params", value=params_json),
                Parameter(name="inputs", value=inputs_json_template(spec.on_exit)),
            ],
        )
        templates += [exit_step, DAG(name=EXIT_TEMPLATE, tasks=[exit_task])]
    return WorkflowTemplate(
        name=spec.name,
        labels=dict(LABELS),
        entrypoint=ENTRYPOINT,
        on_exit=EXIT_TEMPLATE if spec.on_exit is not None else None,
        arguments=[workflow_parameter(p, defaults) for p in workflow_params(spec)],
        workflow_metadata=WorkflowMetadata(labels=dict(LABELS)),
        templates=templates,
    )


def workflow_parameter(param: ArgoParam, defaults: Mapping[str, str] | None = None) -> Parameter:
    default = (defaults or {}).get(param.name, param.default)
    if default is None:  # required: no value at all (Hera renders value=None as "null")
        return Parameter(name=param.name, description=param.description)
    return Parameter(name=param.name, value=default, description=param.description)


def build_templates(defaults: Mapping[str, str] | None = None) -> list[WorkflowTemplate]:
    return [build_workflow_template(make_spec(), defaults) for make_spec in WORKFLOWS.values()]


def render_templates(out_dir: Path, defaults: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``<name>.yaml`` for every WorkflowTemplate into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for template in build_templates(defaults):
        path = out_dir / f"{template.name}.yaml"
        path.write_text(template.to_yaml())
        paths.append(path)
    return paths


class SubmitError(RuntimeError):
    """The Argo server refused the workflow or could not be reached."""


def submit_arguments(
    workflow_name: str, params: PublishParams, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Workflow arguments for one submission.

    Required parameters are always sent; a field equal to its ``PublishParams`` default is left
    out, so the template's (cluster) default applies. ``extra`` sets Argo-only parameters
    (``image``, ``model-cache-pvc``, ``service-account``) by their Argo names.
    """
    spec = WORKFLOWS[workflow_name]()
    known = {p.name: p for p in workflow_params(spec)}
    args: dict[str, str] = {}
    for param in known.values():
        if param.field is None:
            continue
        value = getattr(params, param.field)
        default = PublishParams.__dataclass_fields__[param.field].default
        if param.default is None and not value:
            raise ValueError(f"{workflow_name} needs a value for parameter {param.name!r}")
        if param.default is None or value != default:
            args[param.name] = "" if value is None else str(value)
    for key, value in (extra or {}).items():
        if key not in known:
            raise ValueError(
                f"unknown parameter {key!r} for {workflow_name}; known: {sorted(known)}"
            )
        args[key] = value
    return args


def make_workflow(workflow_name: str, namespace: str, arguments: Mapping[str, str]) -> Workflow:
    """A Workflow that runs the WorkflowTemplate ``workflow_name`` with ``arguments``."""
    return Workflow(
        api_version="argoproj.io/v1alpha1",
        kind="Workflow",
        metadata=ObjectMeta(
            generate_name=f"{workflow_name}-", namespace=namespace, labels=dict(LABELS)
        ),
        spec=ArgoWorkflowSpec(
            workflow_template_ref=WorkflowTemplateRef(name=workflow_name),
            arguments=Arguments(
                parameters=[ParameterModel(name=k, value=v) for k, v in arguments.items()]
            ),
        ),
    )


def submit(
    workflow_name: str,
    params: PublishParams,
    argo_server_url: str,
    namespace: str,
    token: str | None = None,
    verify_ssl: bool = True,
    extra: Mapping[str, str] | None = None,
) -> str:
    """Create a Workflow from the template through the Argo server; returns its name.

    ``POST {argo_server_url}/api/v1/workflows/{namespace}`` with ``{"workflow": ...}`` (Hera's
    ``WorkflowsService.create_workflow``); ``token`` goes out as ``Authorization: Bearer ...``.
    """
    if workflow_name not in WORKFLOWS:
        raise ValueError(f"unknown workflow {workflow_name!r}; known: {sorted(WORKFLOWS)}")
    workflow = make_workflow(
        workflow_name, namespace, submit_arguments(workflow_name, params, extra)
    )
    # urljoin drops the last path segment of a host without a trailing slash (…/argo).
    host = argo_server_url if argo_server_url.endswith("/") else argo_server_url + "/"
    service = WorkflowsService(host=host, token=token, verify_ssl=verify_ssl, namespace=namespace)
    try:
        created = service.create_workflow(
            WorkflowCreateRequest(namespace=namespace, workflow=workflow), namespace=namespace
        )
    except (HeraException, requests.RequestException, pydantic.ValidationError) as exc:
        raise SubmitError(
            f"submitting {workflow_name} to {argo_server_url} (namespace {namespace}) failed: {exc}"
        ) from exc
    if created.metadata is None or not created.metadata.name:
        raise SubmitError(f"the Argo server at {argo_server_url} returned no workflow name")
    return created.metadata.name


__all__ = [
    "ARGO_PARAMS",
    "ArgoParam",
    "SubmitError",
    "build_templates",
    "build_workflow_template",
    "render_templates",
    "submit",
    "submit_arguments",
]
