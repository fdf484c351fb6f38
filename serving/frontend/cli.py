"""``strata serve``: typer options -> ``ServeConfig`` -> ``run_serve``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from serving.router.policies import DEFAULT_PREFILL_SCALE, POLICY_NAMES


def serve(
    model: Annotated[Path, typer.Option("--model", envvar="STRATA_MODEL", help="Checkpoint dir.")],
    workers: Annotated[int, typer.Option("--workers", help="Local workers to start.")] = 1,
    engine: Annotated[str, typer.Option(help="builtin | mock")] = "builtin",
    router: Annotated[str, typer.Option(help=" | ".join(POLICY_NAMES))] = "kv",
    host: Annotated[str, typer.Option(envvar="STRATA_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STRATA_PORT")] = 8000,
    worker_url: Annotated[
        list[str] | None,
        typer.Option(help="External worker: URL[;kv=tcp://h:p][;replay=tcp://h:p][;id=name]."),
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="STRATA_API_KEY")] = None,
    served_model_name: Annotated[str | None, typer.Option()] = None,
    block_size: Annotated[int, typer.Option()] = 16,
    migration_limit: Annotated[int, typer.Option()] = 3,
    kv_prefill_scale: Annotated[
        float, typer.Option(help="kv router: weight of an uncached prompt block vs decode load.")
    ] = DEFAULT_PREFILL_SCALE,
    worker_arg: Annotated[
        list[str] | None,
        typer.Option(help="Extra argument for every local worker, e.g. --worker-arg=--speedup=10"),
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Start local workers and the frontend (KV-aware router inside) until Ctrl-C."""
    from serving.frontend.serve import ServeConfig, run_serve

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if router not in POLICY_NAMES:
        raise typer.BadParameter(f"--router must be one of {', '.join(POLICY_NAMES)}")
    if engine not in ("builtin", "mock"):
        raise typer.BadParameter("--engine must be builtin or mock")
    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"--model {model}: no config.json there")
    config = ServeConfig(
        model_dir=model.absolute(),
        num_workers=workers,
        engine=engine,
        router=router,  # type: ignore[arg-type]
        host=host,
        port=port,
        worker_urls=list(worker_url or []),
        api_key=api_key,
        served_model_name=served_model_name,
        block_size=block_size,
        migration_limit=migration_limit,
        kv_prefill_scale=kv_prefill_scale,
        worker_args=list(worker_arg or []),
    )
    try:
        run_serve(config)
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
