"""Fixtures shared by every test package."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE_DIR = REPO_ROOT / ".strata" / "test-cache"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint (read-only: do not modify).

    Converted from the bundled GGUF once (about 20 s) and cached across runs under
    ``.strata/test-cache``; a cache without ``strata_import.json`` (or with an older format) is
    rebuilt. An exclusive ``flock`` keeps two pytest processes from converting at the same time.
    """
    from workflows.model_import import ModelImportError, bundled_smollm2_gguf, import_gguf

    try:
        gguf_path = bundled_smollm2_gguf()
    except ModelImportError as exc:
        pytest.skip(f"SmolLM2 test model unavailable: {exc}")
    out_dir = TEST_CACHE_DIR / "smollm2-135m-instruct"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out_dir.parent / f"{out_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current_import(out_dir):
            # Under the lock no one else converts here: leftovers are from killed runs.
            for stale in out_dir.parent.glob(f".{out_dir.name}.*.strata-*"):
                shutil.rmtree(stale, ignore_errors=True)
            import_gguf(gguf_path, out_dir, overwrite=True)
    return out_dir


def _is_current_import(out_dir: Path) -> bool:
    from workflows.model_import import PROVENANCE_FILENAME, PROVENANCE_FORMAT

    try:
        provenance = json.loads((out_dir / PROVENANCE_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return provenance.get("format") == PROVENANCE_FORMAT
