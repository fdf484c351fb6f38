"""The ``strata`` command: one typer app that gathers each subsystem's commands."""

from __future__ import annotations

import typer

from workflows import bench_cli, local_cli, model_import, platform_cli

app = typer.Typer(
    name="strata",
    help="Strata: publish LLMs from S3 and serve them behind an OpenAI-compatible endpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model_import.app, name="model")
app.add_typer(local_cli.app, name="local", help="Local S3, MLflow and Prometheus on loopback.")
app.add_typer(bench_cli.app, name="bench", help="Benchmarks: trace replay.")
app.add_typer(
    platform_cli.app, name="platform", help="Render the Kubernetes side of an environment."
)


def _register_serving_commands() -> None:
    from serving.worker.cli import worker

    app.command("worker", help="Run one inference worker (OpenAI HTTP, KV events, metrics).")(
        worker
    )
    from serving.frontend.cli import serve

    app.command("serve", help="Start N workers and the frontend with the KV-aware router.")(serve)
    from workflows.demo import demo

    app.command("demo", help="Publish the bundled SmolLM2 through the workflow and serve it.")(demo)
    from workflows import models_cli, publish_cli, step_cli

    app.command("publish", help="Publish a model: render for Argo, submit, or run --local.")(
        publish_cli.publish
    )
    app.command("step", help="Run one workflow step (what each Argo task runs).")(step_cli.step)

    app.command("models", help="List registered model versions and their aliases.")(
        models_cli.models
    )
    app.command("promote", help="Move alias production to a version (gated).")(models_cli.promote)
    app.command("rollback", help="Move alias production back to previous.")(models_cli.rollback)
    from serving.planner.profile_cli import profile

    app.command("profile", help="Measure an engine's prefill and decode times for the planner.")(
        profile
    )
    from serving.planner.cli import planner

    app.command("planner", help="Scale prefill/decode pools ahead of the load (Kubernetes).")(
        planner
    )


_register_serving_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
