"""deploy, Kubernetes target, pure part: a version's worker Deployment and Service as manifests.

One version of one model is one Deployment of ``strata worker`` pods plus one ClusterIP Service,
both named ``strata-worker-<model>-v<version>`` and labelled with the model and version:

    Service <name> (http 8000, kv-events 5557, kv-replay 5558)
        '--selects--> Deployment <name> --> pods: strata worker --model /model-cache/<staged>
                                                  (model-cache PVC mounted read-only)

Also the strategic merge patches that move a serving-chart release to a version
(``release_patches``). Dicts in, dicts out: no client import and no I/O; ``k8s_deploy`` applies
them. Labels use the chart's domain, ``strata.dev/``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from workflows.pipeline import PublishParams
from workflows.steps.deploy import DeployError

FIELD_MANAGER = "strata"  # server-side apply's field manager and the managed-by label
MODEL_CACHE_MOUNT = "/model-cache"  # where the Argo steps mount the model cache too
HTTP_PORT, KV_EVENTS_PORT, KV_REPLAY_PORT = 8000, 5557, 5558  # replay: the events port + 1
DRAIN_TIMEOUT_S = 30  # the worker's --drain-timeout; the grace period leaves room past it
TERMINATION_GRACE_S = DRAIN_TIMEOUT_S + 30
RUN_AS_UID = 1000
WORKER_APP = "strata-worker"
LABEL_MODEL, LABEL_VERSION = "strata.dev/model", "strata.dev/model-version"  # as the chart's
LABEL_PUBLISH_RUN = "strata.dev/publish-run"  # the publish run that deployed it (exit handler)
# The serving chart's labels: its Deployments, and those promote_release moves.
CHART_NAME_LABEL, CHART_COMPONENT_LABEL = "app.kubernetes.io/name", "app.kubernetes.io/component"
RELEASE_LABEL = "app.kubernetes.io/instance"
RELEASE_COMPONENTS = ("frontend", "worker")
CLUSTER_DOMAIN = "svc.cluster.local"


def resource_name(model: str, version: str) -> str:
    """A DNS-1035 label (Services need one): lowercase, <= 63 chars, hashed when too long."""
    name = f"{WORKER_APP}-{_slug(model)}-v{_slug(version)}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def endpoint_for(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.{CLUSTER_DOMAIN}:{HTTP_PORT}"


def service_from_endpoint(endpoint: str) -> tuple[str, str] | None:
    """``(service, namespace)`` of a cluster Service URL; None for any other URL."""
    host = urlparse(endpoint).hostname or ""
    parts = host.split(".")
    if len(parts) == 5 and ".".join(parts[2:]) == CLUSTER_DOMAIN:
        return parts[0], parts[1]
    return None


def model_path_on_mount(params: PublishParams, staged_dir: Path) -> str:
    """Where the pods see ``staged_dir``: the same path relative to the model-cache mount."""
    staged = PurePosixPath(Path(staged_dir).as_posix())
    for root in (PurePosixPath(params.cache_path.as_posix()), PurePosixPath(MODEL_CACHE_MOUNT)):
        try:
            relative = staged.relative_to(root)
        except ValueError:
            continue
        if relative.parts and ".." not in relative.parts:
            return str(PurePosixPath(MODEL_CACHE_MOUNT) / relative)
    raise DeployError(
        f"staged model {staged_dir} is not on the model cache ({params.cache_dir} or "
        f"{MODEL_CACHE_MOUNT}): pods can only load what the model-cache PVC holds"
    )


def render_worker_manifests(
    params: PublishParams,
    version: str,
    staged_dir: Path,
    *,
    namespace: str,
    image: str,
    pvc_name: str,
    gpu: bool,
) -> list[dict[str, Any]]:
    """The version's Deployment and Service, ready for server-side apply."""
    name = resource_name(params.name, version)
    labels = {
        "app.kubernetes.io/name": WORKER_APP,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        LABEL_MODEL: label_value(params.name),
        LABEL_VERSION: label_value(version),
    }
    if params.run_id:
        labels[LABEL_PUBLISH_RUN] = label_value(params.run_id)
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", LABEL_MODEL, LABEL_VERSION)}

    def metadata() -> dict[str, Any]:  # fresh dicts per object: callers may mutate them
        return {"name": name, "namespace": namespace, "labels": dict(labels)}

    pod_spec = _pod_spec(params, model_path_on_mount(params, staged_dir), image, pvc_name, gpu)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(),
        "spec": {
            "replicas": params.num_workers,
            "selector": {"matchLabels": dict(selector)},
            # Surge first: a new pod is ready before an old one drains.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(selector),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                _tcp_port("kv-events", KV_EVENTS_PORT),
                _tcp_port("kv-replay", KV_REPLAY_PORT),
            ],
        },
    }
    return [deployment, service]


def _pod_spec(
    params: PublishParams, model_path: str, image: str, pvc_name: str, gpu: bool
) -> dict[str, Any]:
    args = [
        "worker",
        "--model", model_path,
        "--engine", params.engine,
        "--host", "0.0.0.0",
        "--port", str(HTTP_PORT),
        "--kv-events-port", str(KV_EVENTS_PORT),
        "--served-model-name", params.name,
        "--device", "cuda" if gpu else "cpu",
        "--drain-timeout", str(DRAIN_TIMEOUT_S),
    ]  # fmt: skip
    resources: dict[str, Any] = {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "32Gi"},
    }
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": "worker",
        "image": image,
        "command": ["strata"],
        "args": args,
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            _tcp_port("kv-events", KV_EVENTS_PORT, container=True),
            _tcp_port("kv-replay", KV_REPLAY_PORT, container=True),
        ],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": resources,
        # Loading weights takes minutes on a fresh node: startup gets 20 min, then liveness
        # tolerates a full drain (503 while draining) before it restarts anything.
        "startupProbe": {**health, "periodSeconds": 5, "failureThreshold": 240},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {
                "name": "model-cache",
                "persistentVolumeClaim": {"claimName": pvc_name, "readOnly": True},
            },
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }
    if gpu:
        resources["requests"]["nvidia.com/gpu"] = "1"  # quantities are strings on the wire
        resources["limits"]["nvidia.com/gpu"] = "1"
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return spec


def _tcp_port(name: str, port: int, *, container: bool = False) -> dict[str, Any]:
    if container:
        return {"name": name, "containerPort": port, "protocol": "TCP"}
    return {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", slug) or "x"


def label_value(text: str) -> str:
    """A valid label value (<= 63 chars of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.") or "x"


def release_patches(
    deployments: list[dict[str, Any]], model: str, model_path: str, version: str
) -> dict[str, dict[str, Any]]:
    """Pure: the strategic merge patch per Deployment of a serving-chart release that moves it
    to ``model_path`` at ``version`` (frontend and workers; others, e.g. the planner, as is).

    Only ``--model=`` in the container's args and the version label change; a release that
    serves another model is refused (``DeployError``).
    """
    label = label_value(version)
    patches = {}
    for deployment in deployments:
        meta = deployment["metadata"]
        if meta["labels"].get(CHART_COMPONENT_LABEL) not in RELEASE_COMPONENTS:
            continue
        served = meta["labels"].get(LABEL_MODEL)
        if served != label_value(model):
            raise DeployError(f"Deployment {meta['name']} serves model {served!r}, not {model!r}")
        containers = []
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            args = container.get("args") or []
            if not any(a.startswith("--model=") for a in args):
                raise DeployError(f"Deployment {meta['name']}: no --model= argument to move")
            args = [f"--model={model_path}" if a.startswith("--model=") else a for a in args]
            containers.append({"name": container["name"], "args": args})
        patches[meta["name"]] = {
            "metadata": {"labels": {LABEL_VERSION: label}},
            "spec": {
                "template": {
                    "metadata": {"labels": {LABEL_VERSION: label}},
                    "spec": {"containers": containers},
                }
            },
        }
    return patches
