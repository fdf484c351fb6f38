"""``strata models``, ``strata promote``, ``strata rollback``: the typer shell around
``workflows.steps.registry``. Plain functions; ``workflows/cli.py`` mounts them as commands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from workflows.listing import Column, OutputFormat, emit
from workflows.pipeline import PublishParams
from workflows.steps import registry
from workflows.steps.lifecycle import StepFailed, rollback_step
from workflows.steps.registry import RegistryError, VersionInfo

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
# Logged by the evaluate and benchmark steps (``workflows/steps/lifecycle.py``).
EVAL_ACCURACY_METRIC = "eval_accuracy"
TTFT_P95_METRIC = "bench_ttft_p95_ms"

TrackingUriOption = Annotated[
    str,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking server.",
        envvar="MLFLOW_TRACKING_URI",
        show_envvar=True,
    ),
]
NameArgument = Annotated[str, typer.Argument(help="Registered model name.", show_default=False)]


OutputOption = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        help="table (plain columns when piped: one line per row) or json (raw values).",
        envvar="STRATA_OUTPUT",
        show_envvar=True,
    ),
]
MODEL_COLUMNS = (
    Column("name", "name", style="bold"),
    Column("version", "version"),
    Column("aliases", "aliases"),
    Column("source", "source", shrink=True),
    Column("manifest", "manifest"),
    Column("eval_acc", "eval acc"),
    Column("ttft_p95", "TTFT p95"),
    Column("created", "created"),  # UTC, ISO 8601 (the Z)
)


def models(
    name: Annotated[
        str | None,
        typer.Option("--name", help="Only this registered model.", show_default=False),
    ] = None,
    tracking_uri: TrackingUriOption = DEFAULT_TRACKING_URI,
    output: OutputOption = OutputFormat.table,
) -> None:
    """List registered model versions with their aliases and key metrics."""
    try:
        infos = registry.list_versions(tracking_uri, name)
        run_to_metrics = {
            i.run_id: registry.get_run_metrics(tracking_uri, i.run_id) for i in infos if i.run_id
        }
    except RegistryError as exc:
        _fail(exc)
    if output == OutputFormat.json:
        emit([_record(i, run_to_metrics.get(i.run_id, {})) for i in infos], (), output=output)
        return
    rows = [_row(info, run_to_metrics.get(info.run_id, {})) for info in infos]
    emit(rows, MODEL_COLUMNS, title=f"registered models ({tracking_uri})")


def promote(
    name: NameArgument,
    version: Annotated[str, typer.Argument(help="Version to promote.", show_default=False)],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if evaluation or benchmark failed.")
    ] = False,
    tracking_uri: TrackingUriOption = DEFAULT_TRACKING_URI,
) -> None:
    """Point alias `production` at VERSION (the old one becomes `previous`)."""
    try:
        moved = registry.promote(tracking_uri, name, version, force=force)
    except RegistryError as exc:
        _fail(exc)
    _print_move(name, moved.production, moved.previous)


def rollback(
    name: NameArgument,
    frontend_url: Annotated[
        str | None,
        typer.Option(
            "--frontend-url",
            help="Also deploy the restored version and switch this serving frontend to it.",
            envvar="STRATA_FRONTEND_URL",
            show_envvar=True,
            show_default=False,
        ),
    ] = None,
    tracking_uri: TrackingUriOption = DEFAULT_TRACKING_URI,
) -> None:
    """Swap aliases `production` and `previous` (twice returns to where it started)."""
    try:
        if frontend_url:
            params = PublishParams(
                name=name, mlflow_tracking_uri=tracking_uri, frontend_url=frontend_url
            )
            moved = rollback_step(params)
            production, previous = moved["production"], moved["previous"]
        else:
            result = registry.rollback(tracking_uri, name)
            production, previous = result.production, result.previous
    except (RegistryError, StepFailed) as exc:
        _fail(exc)
    _print_move(name, production, previous)


def _record(info: VersionInfo, metrics: dict[str, float]) -> dict[str, object]:
    """One version for ``--output json``: raw values, full digest, ISO 8601 time."""
    created = datetime.fromtimestamp(info.created_ms / 1000, UTC)
    return {
        "name": info.name,
        "version": info.version,
        "aliases": info.aliases,
        "source": info.source_uri,
        "manifest_digest": info.manifest_digest or None,
        "staged_dir": info.staged_dir or None,
        "run_id": info.run_id or None,
        "eval_accuracy": metrics.get(EVAL_ACCURACY_METRIC),
        "ttft_p95_ms": metrics.get(TTFT_P95_METRIC),
        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def _row(info: VersionInfo, metrics: dict[str, float]) -> dict[str, str | list[str] | None]:
    """One version for the table: each cell one word, so piped output splits on spaces."""
    accuracy = metrics.get(EVAL_ACCURACY_METRIC)
    ttft_ms = metrics.get(TTFT_P95_METRIC)
    created = datetime.fromtimestamp(info.created_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%MZ")
    return {
        "name": info.name,
        "version": info.version,
        "aliases": info.aliases,
        "source": info.source_uri,
        "manifest": info.manifest_digest[:12] or None,
        "eval_acc": None if accuracy is None else f"{accuracy:.3f}",
        "ttft_p95": None if ttft_ms is None else f"{ttft_ms:.1f}ms",
        "created": created,
    }


def _print_move(name: str, production: str, previous: str | None) -> None:
    Console(soft_wrap=True).print(
        f"{escape(name)}: production -> version {production}, "
        f"previous -> {'version ' + previous if previous else '(none)'}"
    )


def _fail(exc: Exception) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
    raise typer.Exit(1) from exc
