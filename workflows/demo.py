"""``strata demo`` (what ``make demo`` runs): S3 -> publish workflow -> served endpoint.

1. start the local services (S3 on moto, MLflow, Prometheus when installed);
2. import the bundled SmolLM2-135M-Instruct (once) and upload it to
   ``s3://strata-models/smollm2-135m-instruct/`` with its manifest (skipped when unchanged);
3. run the publish workflow locally: stage, verify, register, deploy, evaluate, benchmark,
   promote (skipped when production already serves these exact weights: then production is
   redeployed);
4. serve ``models:/smollm2-135m-instruct@production`` behind the frontend on
   ``http://HOST:PORT/v1`` until Ctrl-C; later ``strata publish --local --frontend-url ...``
   runs switch it without dropping requests.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from workflows.model_import import PROVENANCE_FILENAME, bundled_smollm2_gguf, import_gguf

if TYPE_CHECKING:
    from workflows.local_services import LocalServices
    from workflows.pipeline import PublishParams
    from workflows.steps.registry import VersionInfo

DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_SOURCE = f"s3://strata-models/{DEMO_MODEL_NAME}/"

logger = logging.getLogger(__name__)


def ensure_demo_model(model_dir: Path) -> Path:
    """Import SmolLM2 into ``model_dir`` unless a complete import is already there."""
    if (model_dir / PROVENANCE_FILENAME).is_file():
        return model_dir
    typer.echo(f"importing SmolLM2-135M-Instruct into {model_dir} (about 20 s, once) ...")
    return import_gguf(bundled_smollm2_gguf(), model_dir, overwrite=True)


def curl_example(host: str, port: int, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32,
        "temperature": 0,
    }
    return (
        f"curl -s http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body)}'"
    )


def upload_if_changed(model_dir: Path, source: str, s3_endpoint_url: str) -> str:
    """Upload unless S3 already holds a published manifest with the same digest."""
    from workflows.steps.manifest import build_manifest, parse_manifest
    from workflows.steps.s3 import make_s3_client, parse_s3_uri, upload_dir

    local = build_manifest(model_dir)
    bucket, prefix = parse_s3_uri(source)
    client = make_s3_client(s3_endpoint_url)
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}strata-manifest.json")["Body"]
        if parse_manifest(body.read().decode()).digest == local.digest:
            typer.echo(f"{source} is up to date (manifest {local.digest[:12]})")
            return local.digest
    except Exception:  # no bucket or no manifest yet: upload
        pass
    typer.echo(f"uploading {model_dir} to {source} ...")
    return upload_dir(model_dir, source, endpoint_url=s3_endpoint_url, create_bucket=True).digest


def demo(
    host: Annotated[str, typer.Option(envvar="STRATA_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STRATA_PORT")] = 8000,
    model_dir: Annotated[Path, typer.Option()] = Path(".strata/models") / DEMO_MODEL_NAME,
    engine: Annotated[str, typer.Option(help="builtin | mock")] = "builtin",
    republish: Annotated[bool, typer.Option(help="Publish even if production is current")] = False,
    s3_port: Annotated[int, typer.Option(envvar="STRATA_LOCAL_S3_PORT")] = 9000,
    mlflow_port: Annotated[int, typer.Option(envvar="STRATA_LOCAL_MLFLOW_PORT")] = 5000,
    prometheus_port: Annotated[int, typer.Option(envvar="STRATA_LOCAL_PROMETHEUS_PORT")] = 9090,
    prometheus: Annotated[bool, typer.Option(help="Start Prometheus when installed")] = True,
    grafana_port: Annotated[int, typer.Option(envvar="STRATA_LOCAL_GRAFANA_PORT")] = 3000,
) -> None:
    """Publish the bundled SmolLM2 from local S3 through the workflow and serve production."""
    from workflows.local_services import start_local_services
    from workflows.pipeline import PublishParams, publish_workflow
    from workflows.steps import registry
    from workflows.steps.deploy import deploy_candidate

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (a test's teardown, `kill`) unwinds like Ctrl-C: the publish's exit handler and the
    # clean-up below stop the candidate and production workers instead of leaving them running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    services = start_local_services(
        s3_port=s3_port,
        mlflow_port=mlflow_port,
        prometheus_port=prometheus_port,
        with_prometheus=prometheus,
        # Grafana over that Prometheus, where a grafana binary or a container runtime exists.
        grafana_port=grafana_port if prometheus else None,
    )
    os.environ.update(services.client_env())
    typer.echo(f"local services: S3 {services.s3_url}, MLflow {services.mlflow_url}")
    model_dir = ensure_demo_model(model_dir.absolute())
    digest = upload_if_changed(model_dir, DEMO_SOURCE, services.s3_url)
    params = PublishParams(
        name=DEMO_MODEL_NAME,
        source=DEMO_SOURCE,
        cache_dir=str(Path(".strata/model-cache").absolute()),
        s3_endpoint_url=services.s3_url,
        mlflow_tracking_uri=services.mlflow_url,
        engine=engine,
    )
    production = _current_production(params)
    if republish or production is None or production.manifest_digest != digest:
        from workflows.local_runner import DEFAULT_STATE_DIR, WorkflowFailed, run_workflow

        try:
            run_workflow(publish_workflow(), params, state_dir=DEFAULT_STATE_DIR)
        except WorkflowFailed as exc:
            typer.echo(
                f"{exc}\nresume it with: strata publish --local --resume {exc.result.run_id}"
                " (then `strata demo` serves what it promoted)",
                err=True,
            )
            raise typer.Exit(1) from exc
        production = registry.resolve(
            params.mlflow_tracking_uri, f"models:/{DEMO_MODEL_NAME}@production"
        )
    else:
        typer.echo(f"production is version {production.version} with these weights: redeploying")
    deployment = deploy_candidate(params, production.version, Path(production.staged_dir))
    try:
        _serve_frontend(host, port, model_dir, deployment.endpoint, services)
    finally:
        from workflows.steps.deploy import list_deployments, stop_deployment

        for running in list_deployments():
            stop_deployment(running)
        typer.echo("stopped the model deployments; `strata local down` stops S3 and MLflow")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _current_production(params: PublishParams) -> VersionInfo | None:
    from workflows.steps import registry

    try:
        return registry.resolve(params.mlflow_tracking_uri, f"models:/{DEMO_MODEL_NAME}@production")
    except registry.RegistryError:
        return None


def _serve_frontend(
    host: str, port: int, model_dir: Path, endpoint: str, services: LocalServices
) -> None:
    from serving.frontend.serve import ServeConfig, run_serve

    typer.echo(
        f"\nserving models:/{DEMO_MODEL_NAME}@production\n"
        f"  endpoint:  http://{host}:{port}/v1\n"
        f"  try:       {curl_example(host, port, DEMO_MODEL_NAME)}\n"
        f"  MLflow UI: {services.mlflow_url}/#/models/{DEMO_MODEL_NAME}\n"
        f"  metrics:   http://{host}:{port}/metrics\n"
        + (f"  Grafana:   {services.grafana_url}/dashboards\n" if services.grafana_url else "")
        + "  publish a new version into this endpoint:\n"
        f"    strata publish --local --source {DEMO_SOURCE} --name {DEMO_MODEL_NAME} "
        f"--frontend-url http://{host}:{port}\n"
    )
    from workflows.metrics import WORKFLOW_REGISTRY

    config = ServeConfig(
        extra_metric_registries=[WORKFLOW_REGISTRY],
        prometheus_targets_dir=services.root / "prometheus" / "targets",
        model_dir=model_dir,
        num_workers=0,
        host=host,
        port=port,
        worker_urls=[endpoint],
        served_model_name=DEMO_MODEL_NAME,
    )
    run_serve(config)
