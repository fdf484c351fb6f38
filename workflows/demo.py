"""``strata demo``: the one command that ends with a served endpoint.

Until the publish workflow (S3 -> stage -> verify -> register -> deploy -> promote) runs it, the
demo imports the bundled SmolLM2-135M-Instruct (once; later runs reuse the checkpoint) and
serves it with one built-in worker, printing the endpoint and a ready-to-paste ``curl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from workflows.model_import import PROVENANCE_FILENAME, bundled_smollm2_gguf, import_gguf

DEMO_MODEL_NAME = "smollm2-135m-instruct"


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


def demo(
    host: Annotated[str, typer.Option(envvar="STRATA_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STRATA_PORT")] = 8000,
    model_dir: Annotated[Path, typer.Option()] = Path(".strata/models") / DEMO_MODEL_NAME,
) -> None:
    """Import the bundled SmolLM2 and serve it on http://HOST:PORT/v1 until Ctrl-C."""
    import logging

    from serving.engine.config import EngineConfig
    from serving.worker.config import WorkerConfig
    from serving.worker.server import run_worker

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = ensure_demo_model(model_dir.absolute())
    config = WorkerConfig(
        engine=EngineConfig(model_dir=model_dir),
        host=host,
        port=port,
        served_model_name=[DEMO_MODEL_NAME],
    )
    typer.echo(
        f"\nendpoint: http://{host}:{port}/v1   (model {DEMO_MODEL_NAME})\n"
        f"metrics:  http://{host}:{port}/metrics\n"
        f"try:      {curl_example(host, port, DEMO_MODEL_NAME)}\n"
    )
    run_worker(config)
