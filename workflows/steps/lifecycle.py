"""The workflow's steps as ``fn(params, **inputs) -> outputs``: thin glue over the step modules.

Each function does one job and returns a small JSON-serialisable dict; the pipeline table
(``workflows/pipeline.py``) wires outputs to inputs. Failures raise ``StepFailed`` (or the step
module's own error) with a message naming what failed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from workflows.pipeline import PublishParams

logger = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A gate or check failed; the message says which and by how much."""

    retryable = False


# Errors that fail the same way on every attempt (checks on data that does not change).
_PERMANENT_ERRORS = {"VerifyError", "ManifestError", "StepFailed"}


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt of the step may succeed: an error's own ``retryable`` says so
    (``RegistryUnavailable`` yes, a refused gate no); a failed check of the data does not;
    anything else (S3 errors, timeouts, a dead connection) may."""
    flag = getattr(exc, "retryable", None)
    if flag is not None:
        return bool(flag)
    return not ({t.__name__ for t in type(exc).__mro__} & _PERMANENT_ERRORS)


def stage_step(params: PublishParams) -> dict[str, Any]:
    from workflows.steps.stage import stage
    from workflows.steps.verify import verify

    result = stage(
        params.source,
        params.cache_path,
        s3_endpoint_url=params.s3_endpoint_url,
        name=staged_name(params),
        check=verify,
    )
    from workflows.metrics import STAGE_BYTES

    STAGE_BYTES.labels(model=params.name).inc(result.downloaded_bytes)
    return {
        "staged_dir": str(result.target_dir),
        "manifest_digest": result.manifest_digest,
        "total_bytes": result.total_bytes,
        "downloaded_bytes": result.downloaded_bytes,
        "duration_s": round(result.duration_s, 3),
    }


def staged_name(params: PublishParams) -> str:
    """One cache directory per distinct source content, so older versions stay servable."""
    from workflows.steps.s3 import make_s3_client, parse_s3_uri
    from workflows.steps.stage import list_source

    bucket, prefix = parse_s3_uri(params.source)
    objects, _ = list_source(make_s3_client(params.s3_endpoint_url), bucket, prefix)
    import hashlib

    digest = hashlib.sha256(
        "\n".join(f"{o.path}:{o.size}:{o.etag}" for o in objects).encode()
    ).hexdigest()
    return f"{params.name}-{digest[:12]}"


def verify_step(params: PublishParams, staged_dir: str) -> dict[str, Any]:
    from workflows.steps.verify import verify

    result = verify(Path(staged_dir))
    return {
        "manifest_digest": result.manifest_digest,
        "architecture": result.architecture,
        "num_parameters": result.num_parameters,
        "checked_published": result.checked_published,
    }


def register_step(params: PublishParams, staged_dir: str, manifest_digest: str) -> dict[str, Any]:
    from workflows.steps import registry

    engine_config = {"engine": params.engine, "num_workers": params.num_workers}
    registered = registry.register_version(
        params.mlflow_tracking_uri,
        params.name,
        source_uri=params.source,
        staged_dir=staged_dir,
        manifest_digest=manifest_digest,
        engine_config=engine_config,
        publish_run=params.run_id,
    )
    return {"version": registered.version, "run_id": registered.run_id}


def deploy_step(params: PublishParams, version: str) -> dict[str, Any]:
    from workflows.steps import deploy, registry

    info = registry.get_version(params.mlflow_tracking_uri, params.name, version)
    started_s = time.monotonic()
    deployment = deploy.deploy_candidate(params, version, Path(info.staged_dir))
    duration_s = time.monotonic() - started_s
    # The planner's lead time reads this: weights loaded and the worker serving, per version.
    try:
        registry.log_version_metrics(
            params.mlflow_tracking_uri, params.name, version, {"deploy_duration_s": duration_s}
        )
    except registry.RegistryError as exc:
        logger.warning("deploy duration not recorded: %s", exc)
    return {"endpoint": deployment.endpoint, "deployment": deployment.name}


def evaluate_step(params: PublishParams, version: str, endpoint: str) -> dict[str, Any]:
    from workflows.steps import evaluate, registry

    report = evaluate.run_evaluation(endpoint, params.name, params.eval_set)
    passed = report.accuracy >= params.eval_min_accuracy
    registry.log_version_metrics(
        params.mlflow_tracking_uri,
        params.name,
        version,
        {"eval_accuracy": report.accuracy, "eval_num_questions": float(report.num_questions)},
        tags={"eval_passed": str(passed).lower(), "eval_set": params.eval_set},
    )
    return {"passed": passed, "accuracy": report.accuracy, "failures": report.failures[:5]}


def benchmark_step(params: PublishParams, version: str, endpoint: str) -> dict[str, Any]:
    from workflows.steps import benchmark, registry

    report = benchmark.run_benchmark(
        endpoint,
        params.name,
        num_requests=params.bench_num_requests,
        concurrency=params.bench_concurrency,
        max_tokens=params.bench_max_tokens,
    )
    slo_ttft_ms, slo_itl_ms = params.slo_ms()
    verdict = benchmark.check_slo(report, slo_ttft_ms, slo_itl_ms)
    registry.log_version_metrics(
        params.mlflow_tracking_uri,
        params.name,
        version,
        report.as_metrics() | {"slo_ttft_p95_ms": slo_ttft_ms, "slo_itl_p95_ms": slo_itl_ms},
        tags={"benchmark_passed": str(verdict.passed).lower()},
    )
    return {"passed": verdict.passed, "violations": verdict.violations, **report.as_metrics()}


def promote_step(
    params: PublishParams,
    version: str,
    evaluate_passed: bool,
    benchmark_passed: bool,
    endpoint: str,
) -> dict[str, Any]:
    from workflows.steps import deploy, registry

    if not (evaluate_passed and benchmark_passed):
        failed = [n for n, ok in (("evaluate", evaluate_passed), ("benchmark", benchmark_passed))
                  if not ok]  # fmt: skip
        raise StepFailed(
            f"version {version} of {params.name} not promoted: {' and '.join(failed)} failed"
        )
    uri = params.mlflow_tracking_uri
    before = registry.get_aliases(uri, params.name)
    moved = registry.promote(uri, params.name, version)
    try:
        if params.release and params.deploy_target == "kubernetes":
            staged_dir = Path(registry.get_version(uri, params.name, version).staged_dir)
            deploy.promote_release(params, version, staged_dir, candidate_endpoint=endpoint)
        elif params.frontend_url:
            deploy.switch_production(params.frontend_url, endpoint, params.name)
    except Exception:
        # Traffic did not move: neither does the registry (a retry promotes again).
        registry.restore_aliases(uri, params.name, before)
        raise
    return {"production": moved.production, "previous": moved.previous}


def cleanup_step(params: PublishParams, status: str) -> dict[str, Any]:
    """Exit handler: remove the candidate's deployment unless this run promoted it.

    A run that did not succeed did not promote (promotion is its last step, and a promotion
    whose traffic switch fails restores the aliases). The registry is asked as well when it
    answers: a version it names as production is never removed.
    """
    from workflows.steps import deploy, registry

    if status == "Succeeded":
        return {"removed": [], "reason": "promoted"}
    try:
        version = registry.find_run_version(params.mlflow_tracking_uri, params.name, params.run_id)
        aliases = registry.get_aliases(params.mlflow_tracking_uri, params.name) if version else {}
    except registry.RegistryUnavailable:
        version, aliases = None, {}  # the run's status decides alone
    if version is not None and aliases.get(registry.PRODUCTION) == version:
        return {"removed": [], "reason": f"version {version} is production"}
    removed = deploy.remove_run_deployments(params)
    return {
        "removed": removed,
        "reason": f"run {status.lower()}: candidate not promoted",
        # A resumed run deploys again: the earlier deploy's outputs are stale.
        "undone": ["deploy"],
    }


def rollback_step(params: PublishParams) -> dict[str, Any]:
    from workflows.steps import deploy, registry

    moved = registry.rollback(params.mlflow_tracking_uri, params.name)
    if params.release and params.deploy_target == "kubernetes":
        info = registry.get_version(params.mlflow_tracking_uri, params.name, moved.production)
        deploy.promote_release(params, moved.production, Path(info.staged_dir))
    elif params.frontend_url:
        info = registry.get_version(params.mlflow_tracking_uri, params.name, moved.production)
        deployment = deploy.deploy_candidate(params, moved.production, Path(info.staged_dir))
        deploy.switch_production(params.frontend_url, deployment.endpoint, params.name)
    return {"production": moved.production, "previous": moved.previous}
