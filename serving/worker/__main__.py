"""``python -m serving.worker`` = ``strata worker``."""

import typer

from serving.worker.cli import worker

if __name__ == "__main__":
    typer.run(worker)
