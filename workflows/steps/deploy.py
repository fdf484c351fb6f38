"""deploy: start the serving stack for a model version; switch production to it on promote.

Locally a deployment is a set of ``strata worker`` processes (detached, so they outlive the
workflow run) with their pid files and logs under ``.strata/deployments/<name>-v<version>/``.
Promotion registers the candidate's workers with the production frontend and then deregisters
and drains the old ones: the frontend stops routing new requests to them at once, and SIGTERM
lets their in-flight requests finish, so no request is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from serving.netutil import free_port, free_port_pair, is_healthy
from serving.vllm_engine.launcher import (
    VLLMNotFoundError,
    find_vllm_python,
    vllm_command,
    vllm_env,
)
from workflows.pipeline import PublishParams

logger = logging.getLogger(__name__)

DEPLOYMENTS_DIR = Path(".strata/deployments")


class DeployError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    endpoint: str  # base URL of the OpenAI API (without /v1)
    pids: tuple[int, ...]
    directory: Path


def deployment_name(model: str, version: str) -> str:
    return f"{model}-v{version}"


def deploy_candidate(
    params: PublishParams,
    version: str,
    staged_dir: Path,
    *,
    root: Path = DEPLOYMENTS_DIR,
    startup_timeout_s: float = 300.0,
) -> Deployment:
    """Start (or reuse, when already healthy) the version's local deployment, or apply its
    Kubernetes Deployment and Service and wait until every replica is ready."""
    if params.deploy_target == "kubernetes":
        return _deploy_kubernetes(params, version, staged_dir, root=root)
    if params.deploy_target != "local":
        raise DeployError(
            f"unknown deploy target {params.deploy_target!r}: use 'local' or 'kubernetes'"
        )
    name = deployment_name(params.name, version)
    directory = root / name
    existing = read_deployment(directory)
    if existing is not None and is_healthy(existing.endpoint):
        logger.info("deployment %s already running at %s", name, existing.endpoint)
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    port, kv_port = free_port(), free_port_pair()
    cmd, env = _worker_command(params, staged_dir, port, kv_port)
    log = (directory / "worker-0.log").open("a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    log.close()
    endpoint = f"http://127.0.0.1:{port}"
    deployment = Deployment(name, endpoint, (proc.pid,), directory)
    (directory / "deployment.json").write_text(
        json.dumps(
            {
                "name": name,
                "endpoint": endpoint,
                "pids": [proc.pid],
                "version": version,
                "staged_dir": str(staged_dir),
                "run_id": params.run_id,
            }
        )
    )
    deadline = time.monotonic() + startup_timeout_s
    while not is_healthy(endpoint):
        if proc.poll() is not None:
            tail = (directory / "worker-0.log").read_text()[-2000:]
            raise DeployError(f"deployment {name}: worker exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            stop_deployment(deployment)
            raise DeployError(f"deployment {name}: not healthy after {startup_timeout_s:.0f} s")
        time.sleep(0.2)
    logger.info("deployment %s serving at %s", name, endpoint)
    return deployment


def _worker_command(
    params: PublishParams, staged_dir: Path, port: int, kv_port: int
) -> tuple[list[str], dict[str, str] | None]:
    """The local worker's command line and environment: ``strata worker``, or for
    ``engine: vllm`` a stock vLLM server (``serving/vllm_engine/launcher.py``)."""
    model_dir = Path(staged_dir).absolute()
    if params.engine == "vllm":
        try:
            python = find_vllm_python()
        except VLLMNotFoundError as exc:
            raise DeployError(f"engine vllm: {exc}") from None
        cmd = vllm_command(python, model_dir=model_dir, served_model_name=params.name,
                           port=port, kv_events_port=kv_port)  # fmt: skip
        return cmd, vllm_env(os.environ)
    return [
        sys.executable, "-m", "serving.worker",
        "--model", str(model_dir),
        "--engine", params.engine,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--kv-events-port", str(kv_port),
        "--served-model-name", params.name,
        "--log-level", "warning",
    ], None  # fmt: skip


def _deploy_kubernetes(
    params: PublishParams, version: str, staged_dir: Path, *, root: Path
) -> Deployment:
    """Kubernetes target: settings from ``STRATA_K8S_NAMESPACE``, ``STRATA_IMAGE``,
    ``STRATA_MODEL_CACHE_PVC`` and ``STRATA_K8S_READY_TIMEOUT_S``; no local processes."""
    from workflows.steps import k8s_deploy

    name, endpoint = k8s_deploy.deploy(
        params,
        version,
        staged_dir,
        namespace=os.environ.get("STRATA_K8S_NAMESPACE", "strata"),
        image=os.environ.get("STRATA_IMAGE", "ghcr.io/strata-llm/strata:latest"),
        pvc_name=os.environ.get("STRATA_MODEL_CACHE_PVC", "strata-model-cache"),
        gpu=params.engine != "mock",
        api_client=k8s_deploy.make_api_client(),
        timeout_s=float(os.environ.get("STRATA_K8S_READY_TIMEOUT_S", "1200")),
    )
    return Deployment(name, endpoint, (), root / name)


def promote_release(
    params: PublishParams, version: str, staged_dir: Path, candidate_endpoint: str | None = None
) -> list[str]:
    """Move the serving-chart release ``params.release`` to ``version`` and wait for its
    rollout, then delete the candidate's own Deployment (``candidate_endpoint``, a cluster
    Service URL), which the release now replaces. Settings as ``_deploy_kubernetes``."""
    from workflows.steps import k8s_deploy, k8s_manifests

    if params.deploy_target != "kubernetes" or not params.release:
        raise DeployError("promoting a chart release needs deploy_target kubernetes and release")
    api_client = k8s_deploy.make_api_client()
    patched = k8s_deploy.promote_release(
        params.release,
        params,
        version,
        staged_dir,
        namespace=os.environ.get("STRATA_K8S_NAMESPACE", "strata"),
        api_client=api_client,
        timeout_s=float(os.environ.get("STRATA_K8S_READY_TIMEOUT_S", "1200")),
    )
    if candidate_endpoint and k8s_manifests.service_from_endpoint(candidate_endpoint):
        k8s_deploy.delete_for_endpoint(candidate_endpoint, api_client)
    logger.info("release %s serves version %s (%s)", params.release, version, ", ".join(patched))
    return patched


def read_deployment(directory: Path) -> Deployment | None:
    try:
        doc = json.loads((directory / "deployment.json").read_text())
    except (OSError, ValueError):
        return None
    return Deployment(doc["name"], doc["endpoint"], tuple(doc["pids"]), directory)


def list_deployments(root: Path = DEPLOYMENTS_DIR) -> list[Deployment]:
    found = [read_deployment(d) for d in sorted(root.glob("*")) if d.is_dir()]
    return [d for d in found if d is not None]


def stop_deployment(deployment: Deployment, timeout_s: float = 60.0) -> None:
    """SIGTERM (workers drain in-flight requests), then SIGKILL after ``timeout_s``."""
    for pid in deployment.pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in deployment.pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # a session leader's children (vLLM's engine core)
    (deployment.directory / "deployment.json").unlink(missing_ok=True)


def remove_run_deployments(params: PublishParams, *, root: Path = DEPLOYMENTS_DIR) -> list[str]:
    """Stop (locally) or delete (Kubernetes) every deployment publish run ``params.run_id``
    started; returns their names. Nothing without a run id."""
    if not params.run_id:
        return []
    if params.deploy_target == "kubernetes":
        from workflows.steps import k8s_deploy

        return k8s_deploy.delete_for_run(
            params.run_id,
            os.environ.get("STRATA_K8S_NAMESPACE", "strata"),
            k8s_deploy.make_api_client(),
        )
    removed = []
    for deployment in list_deployments(root):
        if _run_of(deployment) == params.run_id:
            stop_deployment(deployment)
            removed.append(deployment.name)
    return removed


def _run_of(deployment: Deployment) -> str:
    try:
        doc = json.loads((deployment.directory / "deployment.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(doc.get("run_id") or "")


def switch_production(
    frontend_url: str,
    endpoint: str,
    model: str,
    *,
    root: Path = DEPLOYMENTS_DIR,
    version: str | None = None,
    admin_key: str | None = None,
) -> list[str]:
    """Route the frontend's ``model`` to ``endpoint`` only; returns the ids of workers taken
    out. The frontend's other models are not touched.

    Order matters: the new worker is registered (and healthy) before any old one leaves, so
    there is always a worker to route to; it joins as a version of its own (``version``, else
    its endpoint), so new requests go to it at once while the old version finishes its
    streams. Old workers of the model are deregistered (no new requests) and then drained by
    SIGTERM: local deployments directly, Kubernetes ones (cluster Service URLs) by deleting
    their Deployment and Service. ``admin_key`` (default ``$STRATA_ADMIN_KEY``): the
    frontend's admin credential.
    """
    from workflows.steps import k8s_deploy, k8s_manifests

    base = frontend_url.rstrip("/")
    api_client = None
    admin_key = admin_key or os.environ.get("STRATA_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    with httpx.Client(timeout=30, headers=headers) as client:
        body = {"url": endpoint, "version": version or endpoint}
        added = client.post(f"{base}/admin/workers", json=body)
        if added.status_code != 201:
            raise DeployError(f"frontend {base} refused worker {endpoint}: {added.text}")
        new_id = added.json()["worker_id"]
        served = added.json().get("model", model)
        workers = client.get(f"{base}/admin/workers").json()["workers"]
        removed = []
        for worker in workers:
            if worker["worker_id"] == new_id or worker.get("model", served) != served:
                continue
            client.delete(f"{base}/admin/workers/{worker['worker_id']}")
            removed.append(worker["worker_id"])
            if k8s_manifests.service_from_endpoint(worker["url"]) is not None:
                api_client = api_client or k8s_deploy.make_api_client()
                k8s_deploy.delete_for_endpoint(worker["url"], api_client)
                continue
            for deployment in list_deployments(root):
                if deployment.endpoint == worker["url"]:
                    stop_deployment(deployment)
    logger.info("production for %s now %s (removed %s)", model, endpoint, removed or "none")
    return removed


def _alive(pid: int) -> bool:
    """Running and not a zombie (a worker started by another process may await its reaping)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
