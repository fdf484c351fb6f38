"""``strata planner --config FILE``: the planner alone (the cluster's planner Deployment).

Flags override the file; each has a ``STRATA_*`` environment fallback shown in ``--help``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer


def _opt(*names: str, help: str, env: str) -> Any:
    return typer.Option(*names, help=help, envvar=f"STRATA_PLANNER_{env}", show_envvar=True)


def planner(
    config: Annotated[Path, _opt("--config", help="Planner config (YAML).", env="CONFIG")],
    advisory: Annotated[
        bool | None,
        _opt("--advisory/--act", help="Log decisions without acting (mode).", env="ADVISORY"),
    ] = None,
    prometheus_url: Annotated[
        str | None,
        _opt("--prometheus-url", help="Read metrics from this Prometheus.", env="PROMETHEUS_URL"),
    ] = None,
    frontend_url: Annotated[
        str | None,
        _opt("--frontend-url", help="The frontend (scrape, drains).", env="FRONTEND_URL"),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            "--admin-key",
            envvar="STRATA_ADMIN_KEY",
            show_envvar=True,
            help="The frontend's admin bearer token (worker list, drains).",
        ),
    ] = None,
    namespace: Annotated[
        str | None, _opt("--namespace", help="Kubernetes namespace.", env="NAMESPACE")
    ] = None,
    metrics_port: Annotated[
        int | None, _opt("--metrics-port", help="Serve /metrics here.", env="METRICS_PORT")
    ] = None,
    log_level: Annotated[str, _opt("--log-level", help="Log level.", env="LOG_LEVEL")] = "info",
) -> None:
    """Size the prefill and decode pools ahead of the load, by the lead time; drain on the way
    down."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from serving.planner.config import ConfigError, load_config

    overrides: dict[str, Any] = {}
    if advisory is not None:
        overrides["mode"] = "advisory" if advisory else "act"
    if prometheus_url:
        overrides |= {"metrics.kind": "prometheus", "metrics.prometheus_url": prometheus_url}
    if frontend_url:
        overrides["metrics.frontend_url"] = frontend_url
    if namespace:
        overrides["connector.kubernetes.namespace"] = namespace
    if metrics_port is not None:
        overrides["metrics_port"] = metrics_port
    try:
        cfg = load_config(config, overrides)
        runner = build_runner(cfg, admin_key)
    except (ConfigError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if cfg.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, registry=runner.metrics.registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    typer.echo(
        f"strata planner: model {cfg.model}, roles {', '.join(cfg.roles)}, connector "
        f"{cfg.connector.kind}, metrics {cfg.metrics.kind}, mode {cfg.mode}"
    )
    try:
        runner.run(stop)
    finally:
        runner.close()


def build_runner(cfg: Any, admin_key: str | None) -> Any:
    """The standalone planner: the Kubernetes connector (or the virtual one is the
    simulator's; the local one lives in ``strata serve --planner``)."""
    from serving.planner.connectors.base import ConnectorError
    from serving.planner.connectors.frontend_admin import FrontendAdmin
    from serving.planner.connectors.kubernetes import KubernetesConnector
    from serving.planner.metrics import PlannerMetrics
    from serving.planner.metrics_source import make_source
    from serving.planner.profile import ProfileError
    from serving.planner.runner import PlannerRunner, build_state

    if cfg.connector.kind != "kubernetes":
        raise ValueError(
            f"connector.kind {cfg.connector.kind!r}: `strata planner` drives Kubernetes; the "
            "local connector runs inside `strata serve --planner`, the virtual one in "
            "`strata bench planner`"
        )
    try:
        state = build_state(cfg)
        frontend = FrontendAdmin(cfg.metrics.frontend_url, admin_key)
        connector = KubernetesConnector(
            cfg.connector.kubernetes, tuple(cfg.roles), drain=cfg.connector.drain,
            frontend=frontend,
        )  # fmt: skip
    except (ProfileError, ConnectorError) as exc:
        raise ValueError(str(exc)) from exc
    source = make_source(cfg.metrics, cfg.model, admin_key)
    metrics = PlannerMetrics(cfg.model, tuple(cfg.roles))
    return PlannerRunner(cfg, state, connector, source, metrics)
