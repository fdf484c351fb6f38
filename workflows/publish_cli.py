"""``strata publish``: render the Argo templates, submit a run to Argo, or run it locally.

One ``PublishParams`` is built from the options and handed to whichever runner is asked for:
``--render DIR`` writes both WorkflowTemplates' YAML, ``--argo-server URL`` submits a Workflow
from ``publish-model`` through Argo's API, ``--local`` runs the same steps in-process.
A plain function; ``workflows/cli.py`` mounts it as a command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from workflows.pipeline import CLUSTER_SLO_MS, LOCAL_SLO_MS, PublishParams, publish_workflow

ARGO_PANEL = "Argo"
GATES_PANEL = "Gates"
_DEFAULTS = PublishParams(name="")


def _fail(message: str, exc: BaseException | None = None) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(1) from exc


def _option(flag: str, help: str, envvar: str | None = None, panel: str | None = None) -> Any:
    return typer.Option(
        flag,
        help=help,
        envvar=envvar,
        show_envvar=envvar is not None,
        show_default=False,
        rich_help_panel=panel,
    )


def make_params(**options: Any) -> PublishParams:
    """``PublishParams`` from the options that were given; the rest keep their defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    if "cache_dir" in given:
        given["cache_dir"] = str(given["cache_dir"])
    return PublishParams(**given)


def publish(
    source: Annotated[
        str | None, _option("--source", "Weights to publish: s3://bucket/prefix/.")
    ] = None,
    name: Annotated[str | None, _option("--name", "Registered model name.")] = None,
    render: Annotated[
        Path | None, _option("--render", "Write the WorkflowTemplates' YAML into this directory.")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run the steps in-process, in DAG order.")
    ] = False,
    resume: Annotated[
        str | None,
        _option(
            "--resume",
            "With --local: continue the failed run RUN_ID with its parameters; steps that "
            "succeeded are not run again (as `argo retry` does in a cluster).",
        ),
    ] = None,
    argo_server: Annotated[
        str | None,
        _option(
            "--argo-server", "Submit to this Argo server URL.", "STRATA_ARGO_SERVER", ARGO_PANEL
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        _option(
            "--namespace",
            "Namespace of the WorkflowTemplates.",
            "STRATA_ARGO_NAMESPACE",
            ARGO_PANEL,
        ),
    ] = None,
    token: Annotated[
        str | None, _option("--token", "Argo bearer token.", "STRATA_ARGO_TOKEN", ARGO_PANEL)
    ] = None,
    verify_ssl: Annotated[
        bool,
        typer.Option(
            "--verify-ssl/--no-verify-ssl",
            help="Check the Argo server's TLS certificate.",
            rich_help_panel=ARGO_PANEL,
        ),
    ] = True,
    image: Annotated[
        str | None, _option("--image", "Step image (default: the template's).", panel=ARGO_PANEL)
    ] = None,
    model_cache_pvc: Annotated[
        str | None,
        _option(
            "--model-cache-pvc",
            "PVC of the model cache (default: the template's).",
            panel=ARGO_PANEL,
        ),
    ] = None,
    service_account: Annotated[
        str | None,
        _option("--service-account", "Service account of the step pods.", panel=ARGO_PANEL),
    ] = None,
    slo_ttft_p95_ms: Annotated[
        float | None,
        _option(
            "--slo-ttft-p95-ms",
            f"Benchmark gate: p95 TTFT, ms (default {CLUSTER_SLO_MS[0]:.0f} in a cluster, "
            f"{LOCAL_SLO_MS[0]:.0f} with --local).",
            panel=GATES_PANEL,
        ),
    ] = None,
    slo_itl_p95_ms: Annotated[
        float | None,
        _option(
            "--slo-itl-p95-ms",
            f"Benchmark gate: p95 ITL, ms (default {CLUSTER_SLO_MS[1]:.0f} in a cluster, "
            f"{LOCAL_SLO_MS[1]:.0f} with --local).",
            panel=GATES_PANEL,
        ),
    ] = None,
    eval_min_accuracy: Annotated[
        float | None,
        _option(
            "--eval-min-accuracy",
            f"Evaluation gate: accuracy 0..1 (default {_DEFAULTS.eval_min_accuracy}).",
            panel=GATES_PANEL,
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        _option("--s3-endpoint-url", "S3 endpoint (default: AWS S3).", "STRATA_S3_ENDPOINT_URL"),
    ] = None,
    mlflow_tracking_uri: Annotated[
        str | None,
        _option("--mlflow-tracking-uri", "MLflow tracking server.", "MLFLOW_TRACKING_URI"),
    ] = None,
    cache_dir: Annotated[
        Path | None, _option("--cache-dir", "Model cache directory (--local).", "STRATA_CACHE_DIR")
    ] = None,
    frontend_url: Annotated[
        str | None,
        _option(
            "--frontend-url", "Frontend to switch to the promoted version.", "STRATA_FRONTEND_URL"
        ),
    ] = None,
) -> None:
    """Publish a model: stage, verify, register, deploy, evaluate, benchmark, promote."""
    if resume is not None and (not local or source or name):
        _fail("--resume RUN_ID goes with --local alone (the run keeps its parameters)")
    if not (render or local or argo_server):
        _fail("nothing to do: pass --render DIR, --local or --argo-server URL")
    if local and argo_server:
        _fail("--local and --argo-server are two runners for one run: pick one")
    if render is not None:
        _render(render)
    if resume is not None:
        _resume_local(resume)
        return
    if not (local or argo_server):
        return
    if not source or not name:
        _fail("--source and --name are needed to publish")
    params = make_params(
        source=source,
        name=name,
        slo_ttft_p95_ms=slo_ttft_p95_ms,
        slo_itl_p95_ms=slo_itl_p95_ms,
        eval_min_accuracy=eval_min_accuracy,
        s3_endpoint_url=s3_endpoint_url,
        mlflow_tracking_uri=mlflow_tracking_uri,
        cache_dir=cache_dir,
        frontend_url=frontend_url,
    )
    if local:
        _run_local(params)
        return
    extra = {"image": image, "model-cache-pvc": model_cache_pvc, "service-account": service_account}
    _submit(params, argo_server or "", namespace, token, verify_ssl, extra)


def _render(out_dir: Path) -> None:
    from workflows.argo import render_templates

    for path in render_templates(out_dir):
        typer.echo(f"wrote {path}")


def _run_local(params: PublishParams, resume: bool = False) -> None:
    from workflows.local_runner import DEFAULT_STATE_DIR, WorkflowFailed, run_workflow

    try:
        run_workflow(publish_workflow(), params, state_dir=DEFAULT_STATE_DIR, resume=resume)
    except WorkflowFailed as exc:
        _fail(
            f"publish of {params.name} failed: {exc}\n"
            f"resume it with: strata publish --local --resume {exc.result.run_id}",
            exc,
        )
    except Exception as exc:  # the runner names the failed step; show it without a traceback
        _fail(f"publish of {params.name} failed: {exc}", exc)


def _resume_local(run_id: str) -> None:
    from workflows.local_runner import DEFAULT_STATE_DIR, load_params

    try:
        params = load_params(DEFAULT_STATE_DIR, run_id)
    except ValueError as exc:
        _fail(str(exc), exc)
    _run_local(params, resume=True)


def _submit(
    params: PublishParams,
    argo_server: str,
    namespace: str | None,
    token: str | None,
    verify_ssl: bool,
    extra: dict[str, str | None],
) -> None:
    from workflows.argo import SubmitError, submit

    if not namespace:
        _fail("--namespace (or STRATA_ARGO_NAMESPACE) is needed with --argo-server")
    try:
        created = submit(
            "publish-model",
            params,
            argo_server,
            namespace,
            token=token,
            verify_ssl=verify_ssl,
            extra={k: v for k, v in extra.items() if v is not None},
        )
    except (SubmitError, ValueError) as exc:
        _fail(str(exc), exc)
    typer.echo(f"submitted workflow {namespace}/{created} from template publish-model")
