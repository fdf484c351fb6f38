"""``python -m serving.frontend``: the same as ``strata serve`` (no workflow dependencies)."""

import typer

from serving.frontend.cli import serve

if __name__ == "__main__":
    typer.run(serve)
