"""``strata local up|down|status``: the typer shell around ``workflows.local_services``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from workflows.listing import Column, OutputFormat, emit
from workflows.local_services import (
    DEFAULT_PORTS,
    DEFAULT_ROOT,
    LocalServices,
    LocalServicesError,
    local_services_status,
    start_local_services,
    stop_local_services,
)

app = typer.Typer(no_args_is_help=True)

RootOption = Annotated[
    Path,
    typer.Option(
        "--root",
        help="Directory for pid files, logs and the services' data.",
        envvar="STRATA_LOCAL_ROOT",
        show_envvar=True,
    ),
]


def _port_option(name: str, what: str) -> object:
    return typer.Option(
        f"--{name}-port",
        help=f"Loopback port of {what}.",
        envvar=f"STRATA_LOCAL_{name.upper()}_PORT",
        show_envvar=True,
    )


@app.callback()
def local_commands() -> None:
    """Local services on loopback: S3 (moto), MLflow (SQLite, artifacts in S3), Prometheus."""


@app.command()
def up(
    root: RootOption = DEFAULT_ROOT,
    s3_port: Annotated[int, _port_option("s3", "the S3 server")] = DEFAULT_PORTS["s3"],
    mlflow_port: Annotated[int, _port_option("mlflow", "MLflow")] = DEFAULT_PORTS["mlflow"],
    prometheus_port: Annotated[int, _port_option("prometheus", "Prometheus")] = DEFAULT_PORTS[
        "prometheus"
    ],
    grafana_port: Annotated[int, _port_option("grafana", "Grafana")] = DEFAULT_PORTS["grafana"],
    grafana: Annotated[
        bool,
        typer.Option(
            help="Start Grafana with the dashboards when a grafana binary or a container "
            "runtime is present.",
            envvar="STRATA_LOCAL_GRAFANA",
            show_envvar=True,
        ),
    ] = True,
    timeout_s: Annotated[
        float,
        typer.Option(
            "--timeout-s",
            help="Seconds to wait for each service to become healthy.",
            envvar="STRATA_LOCAL_TIMEOUT_S",
            show_envvar=True,
        ),
    ] = 300.0,
) -> None:
    """Start the services that are not running and wait until each is healthy."""
    try:
        services = start_local_services(
            root,
            s3_port=s3_port,
            mlflow_port=mlflow_port,
            prometheus_port=prometheus_port,
            startup_timeout_s=timeout_s,
            grafana_port=grafana_port if grafana else None,
        )
    except LocalServicesError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    _print_table(services)
    if services.grafana_url:
        typer.echo(f"Grafana: {services.grafana_url}/dashboards (folder Strata)")
    elif grafana:
        typer.echo("Grafana: not started (no grafana binary, no container runtime); "
                   "docs/observability.md shows the one command that starts it")  # fmt: skip


@app.command()
def down(
    root: RootOption = DEFAULT_ROOT,
    timeout_s: Annotated[
        float,
        typer.Option(
            "--timeout-s",
            help="Seconds between SIGTERM and SIGKILL.",
            envvar="STRATA_LOCAL_STOP_TIMEOUT_S",
            show_envvar=True,
        ),
    ] = 10.0,
    snapshot: Annotated[
        bool,
        typer.Option(
            help="Save the S3 contents under ROOT/s3 before stopping (--no-snapshot drops "
            "what changed since the last one).",
            envvar="STRATA_LOCAL_SNAPSHOT",
            show_envvar=True,
        ),
    ] = True,
) -> None:
    """Stop every service (S3 contents are saved first) and print their state."""
    try:
        services = stop_local_services(root, timeout_s=timeout_s, snapshot=snapshot)
    except LocalServicesError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    _print_table(services)


@app.command()
def status(
    root: RootOption = DEFAULT_ROOT,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "--output",
            "-o",
            help="table (plain columns when piped) or json.",
            envvar="STRATA_OUTPUT",
            show_envvar=True,
        ),
    ] = OutputFormat.table,
) -> None:
    """Show each service's URL, pid and state."""
    _print_table(local_services_status(root), output)


SERVICE_COLUMNS = (
    Column("service", "service", style="bold"),
    Column("url", "url"),
    Column("pid", "pid"),
    Column("state", "state"),
    Column("note", "log / note", shrink=True),
)


def _print_table(services: LocalServices, output: OutputFormat = OutputFormat.table) -> None:
    rows = [
        {
            "service": handle.name,
            "url": handle.url,
            "pid": handle.pid,
            "state": handle.state,
            "note": handle.detail or str(handle.log_path),
        }
        for handle in services.handles
    ]
    emit(rows, SERVICE_COLUMNS, output=output, title=f"strata local services ({services.root})")
