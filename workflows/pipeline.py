"""The publish and rollback workflows, defined once.

Each step is a plain typed function ``fn(params: PublishParams, **inputs) -> dict`` whose
keyword inputs are outputs of earlier steps (``StepSpec.inputs`` names where each comes from),
and whose result is a small JSON-serialisable dict of outputs. Two runners execute this table:

* the local runner (``workflows/local_runner.py``) calls the functions in-process, in DAG order;
* Hera (``workflows/argo.py``) renders one Argo template per step, which runs
  ``strata step NAME --params JSON --inputs JSON`` in a container, and a DAG task per step with
  the same dependencies, retries and input wiring.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Benchmark gates, (TTFT p95, ITL p95) in ms. The cluster's is the serving SLO a GPU meets.
# A local deployment shares a CPU-only laptop with everything else on it (a test suite, other
# processes): its gate catches a candidate that hangs or crawls, not a busy machine.
CLUSTER_SLO_MS = (5000.0, 500.0)
LOCAL_SLO_MS = (60000.0, 5000.0)


@dataclass(frozen=True, slots=True)
class PublishParams:
    """Everything a publish (or rollback) run needs; the same object in both runners."""

    name: str  # registered model name, e.g. "smollm2-135m-instruct"
    source: str = ""  # s3://bucket/prefix/
    cache_dir: str = ".strata/model-cache"  # a directory locally; the PVC mount in a cluster
    s3_endpoint_url: str | None = None  # None: AWS S3
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    # Serving the candidate: local (processes) or kubernetes (rendered manifests).
    deploy_target: str = "local"
    engine: str = "builtin"
    num_workers: int = 1
    frontend_url: str | None = None  # the production endpoint to switch on promote
    # A serving-chart release (platform/helm/strata) in the cluster: promote and rollback move it
    # to the version (instead of switching frontend_url's workers); the candidate then goes.
    release: str | None = None
    # Gates.
    eval_set: str = "default"
    eval_min_accuracy: float = 0.8
    # The benchmark gate; None: the deploy target's default (``slo_ms()``).
    slo_ttft_p95_ms: float | None = None
    slo_itl_p95_ms: float | None = None
    bench_num_requests: int = 16
    bench_concurrency: int = 4
    bench_max_tokens: int = 32
    # Rollback only.
    version: str | None = None
    # The publish run: Argo's workflow uid, or the local runner's run id. Registering is
    # idempotent per run, and the exit handler finds the run's deployment by it.
    run_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PublishParams:
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown publish parameter(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)

    def slo_ms(self) -> tuple[float, float]:
        """(TTFT p95, ITL p95) in ms the benchmark gates on: the values given, else the
        cluster's SLO on Kubernetes and a generous one for a laptop's local processes."""
        ttft, itl = CLUSTER_SLO_MS if self.deploy_target == "kubernetes" else LOCAL_SLO_MS
        return (
            ttft if self.slo_ttft_p95_ms is None else self.slo_ttft_p95_ms,
            itl if self.slo_itl_p95_ms is None else self.slo_itl_p95_ms,
        )


StepFn = Callable[..., dict[str, Any]]
EXIT_HANDLER = "cleanup"  # the publish workflow's exit handler step
# The exit handler's one input: the run's phase (Argo's {{workflow.status}}), not a step output.
WORKFLOW_STATUS = ("workflow", "status")


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    fn: StepFn
    depends: tuple[str, ...] = ()
    # keyword argument -> (step name, output key)
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    retries: int = 0
    # Whether the step needs the model cache volume mounted (in a cluster).
    needs_model_cache: bool = False
    needs_gpu: bool = False


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    name: str  # the Argo WorkflowTemplate name
    steps: tuple[StepSpec, ...]
    # Runs once after every run, whatever its outcome (Argo's onExit), as
    # ``fn(params, status=<the run's phase>)``: Succeeded, Failed or Error.
    on_exit: StepSpec | None = None

    def step(self, name: str) -> StepSpec:
        for spec in self.steps:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def order(self) -> list[StepSpec]:
        """Steps in a valid execution order (the table is written in one; checked here)."""
        done: set[str] = set()
        for spec in self.steps:
            missing = set(spec.depends) - done
            if missing:
                raise ValueError(f"step {spec.name} depends on later step(s) {sorted(missing)}")
            done.add(spec.name)
        return list(self.steps)


def _publish_spec() -> WorkflowSpec:
    from workflows.steps import lifecycle as s

    return WorkflowSpec(
        name="publish-model",
        steps=(
            StepSpec("stage", s.stage_step, retries=3, needs_model_cache=True),
            StepSpec(
                "verify",
                s.verify_step,
                depends=("stage",),
                inputs={"staged_dir": ("stage", "staged_dir")},
                needs_model_cache=True,
            ),
            StepSpec(
                "register",
                s.register_step,
                depends=("verify",),
                inputs={
                    "staged_dir": ("stage", "staged_dir"),
                    "manifest_digest": ("verify", "manifest_digest"),
                },
                retries=2,
            ),
            StepSpec(
                "deploy",
                s.deploy_step,
                depends=("register",),
                inputs={"version": ("register", "version")},
                needs_model_cache=True,
            ),
            StepSpec(
                "evaluate",
                s.evaluate_step,
                depends=("deploy",),
                inputs={"version": ("register", "version"), "endpoint": ("deploy", "endpoint")},
                retries=1,
            ),
            StepSpec(
                "benchmark",
                s.benchmark_step,
                depends=("deploy",),
                inputs={"version": ("register", "version"), "endpoint": ("deploy", "endpoint")},
                retries=1,
            ),
            StepSpec(
                "promote",
                s.promote_step,
                depends=("evaluate", "benchmark"),
                inputs={
                    "version": ("register", "version"),
                    "evaluate_passed": ("evaluate", "passed"),
                    "benchmark_passed": ("benchmark", "passed"),
                    "endpoint": ("deploy", "endpoint"),
                },
                retries=2,
            ),
        ),
        on_exit=StepSpec(
            EXIT_HANDLER,
            s.cleanup_step,
            inputs={"status": (WORKFLOW_STATUS[0], WORKFLOW_STATUS[1])},
            retries=2,
        ),
    )


def _rollback_spec() -> WorkflowSpec:
    from workflows.steps import lifecycle as s

    return WorkflowSpec(
        name="rollback-model",
        steps=(StepSpec("rollback", s.rollback_step, retries=2),),
    )


def publish_workflow() -> WorkflowSpec:
    return _publish_spec()


def rollback_workflow() -> WorkflowSpec:
    return _rollback_spec()


WORKFLOWS: dict[str, Callable[[], WorkflowSpec]] = {
    "publish-model": publish_workflow,
    "rollback-model": rollback_workflow,
}
