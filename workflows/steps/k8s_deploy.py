"""deploy, Kubernetes target: render, apply and await a version's worker Deployment and Service.

One version of one model is one Deployment of ``strata worker`` pods plus one ClusterIP Service,
both named ``strata-worker-<model>-v<version>`` and labelled with the model and version:

    Service <name> (http 8000, kv-events 5557, kv-replay 5558)
        '--selects--> Deployment <name> --> pods: strata worker --model /model-cache/<staged>
                                                  (model-cache PVC mounted read-only)

The rendering functions are pure (dicts in, dicts out, no client import); ``apply_manifests``,
``wait_ready`` and the deletions talk to the API server through the official ``kubernetes``
client and an explicit ``ApiClient``. Applying is server-side apply (field manager ``strata``),
so re-deploying a version is idempotent and a rollback re-applies the same objects.

Promotion into a release of the serving chart (``platform/helm/strata``, ``promote_release``):
the release's frontend and worker Deployments get the promoted version's model path
(``--model=``) and ``strata.dev/model-version`` label by a strategic merge patch (their
replicas, which the planner owns, are not touched), the worker Services the same label (the
frontend's discovery reads it), and Kubernetes rolls the pods over (surge first, drain on
SIGTERM). Labels use the chart's domain, ``strata.dev/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from workflows.pipeline import PublishParams
from workflows.steps.deploy import DeployError

logger = logging.getLogger(__name__)

FIELD_MANAGER = "strata"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
MODEL_CACHE_MOUNT = "/model-cache"  # where the Argo steps mount the model cache too
HTTP_PORT, KV_EVENTS_PORT, KV_REPLAY_PORT = 8000, 5557, 5558  # replay: the events port + 1
DRAIN_TIMEOUT_S = 30  # the worker's --drain-timeout; the grace period leaves room past it
TERMINATION_GRACE_S = DRAIN_TIMEOUT_S + 30
RUN_AS_UID = 1000
WORKER_APP = "strata-worker"
LABEL_MODEL, LABEL_VERSION = "strata.dev/model", "strata.dev/model-version"  # as the chart's
LABEL_PUBLISH_RUN = "strata.dev/publish-run"  # the publish run that deployed it (exit handler)
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
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
        LABEL_MODEL: _label_value(params.name),
        LABEL_VERSION: _label_value(version),
    }
    if params.run_id:
        labels[LABEL_PUBLISH_RUN] = _label_value(params.run_id)
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


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.") or "x"


# --- I/O: the API server, through the official client ---------------------------------------


def apply_manifests(manifests: list[dict[str, Any]], *, api_client: Any) -> None:
    """Server-side apply each Deployment and Service (creates or updates; force owns fields)."""
    from kubernetes import client

    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    appliers = {
        ("apps/v1", "Deployment"): apps.patch_namespaced_deployment,
        ("v1", "Service"): core.patch_namespaced_service,
    }
    for manifest in manifests:
        key = (manifest["apiVersion"], manifest["kind"])
        if key not in appliers:
            raise DeployError(f"cannot apply {key[1]} ({key[0]}): only Deployment and Service")
        meta = manifest["metadata"]
        try:
            appliers[key](
                meta["name"],
                meta["namespace"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_CONTENT_TYPE,
            )
        except client.ApiException as exc:
            raise DeployError(
                f"applying {key[1]} {meta['namespace']}/{meta['name']} failed: "
                f"{exc.status} {exc.reason}: {exc.body}"
            ) from exc
        logger.info("applied %s %s/%s", key[1], meta["namespace"], meta["name"])


def wait_ready(
    name: str, namespace: str, timeout_s: float, api_client: Any, *, poll_s: float = 2.0
) -> None:
    """Poll the Deployment's status until its current generation has every replica ready.

    Ready means ``observedGeneration >= generation`` (the controller saw this spec) and
    ``readyReplicas == updatedReplicas == spec.replicas``. Raises ``DeployError`` at the
    deadline, or at once when the rollout exceeded its progress deadline.
    """
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = apps.read_namespaced_deployment_status(name, namespace)
        except client.ApiException as exc:
            raise DeployError(f"reading Deployment {namespace}/{name}: {exc.status} "
                              f"{exc.reason}") from exc  # fmt: skip
        wanted = found.spec.replicas if found.spec.replicas is not None else 1
        status = found.status or client.V1DeploymentStatus()
        observed = status.observed_generation or 0
        ready, updated = status.ready_replicas or 0, status.updated_replicas or 0
        if observed >= (found.metadata.generation or 0) and ready == updated == wanted:
            logger.info("Deployment %s/%s ready (%d replicas)", namespace, name, ready)
            return
        for condition in status.conditions or []:
            if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
                raise DeployError(f"Deployment {namespace}/{name} stalled: {condition.message}")
        if time.monotonic() + poll_s > deadline:
            raise DeployError(
                f"Deployment {namespace}/{name} not ready after {timeout_s:.0f} s "
                f"({ready}/{wanted} replicas ready)"
            )
        time.sleep(poll_s)


def delete_deployment(name: str, namespace: str, api_client: Any) -> None:
    """Delete the Deployment and its Service; pods get SIGTERM and drain. Missing is fine."""
    from kubernetes import client

    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    for kind, delete in (
        ("Deployment", apps.delete_namespaced_deployment),
        ("Service", core.delete_namespaced_service),
    ):
        try:
            delete(name, namespace, propagation_policy="Background")
        except client.ApiException as exc:
            if exc.status != 404:
                raise DeployError(f"deleting {kind} {namespace}/{name}: {exc.status} "
                                  f"{exc.reason}") from exc  # fmt: skip
        logger.info("deleted %s %s/%s", kind, namespace, name)


def delete_for_run(run_id: str, namespace: str, api_client: Any) -> list[str]:
    """Delete the worker Deployments (and Services) labelled with publish run ``run_id``;
    returns their names."""
    from kubernetes import client

    selector = f"{LABEL_PUBLISH_RUN}={_label_value(run_id)}"
    try:
        found = client.AppsV1Api(api_client).list_namespaced_deployment(
            namespace, label_selector=selector
        )
    except client.ApiException as exc:
        raise DeployError(f"listing Deployments {selector} in {namespace}: {exc.status}") from exc
    names = [d.metadata.name for d in found.items]
    for name in names:
        delete_deployment(name, namespace, api_client)
    return names


def delete_for_endpoint(endpoint: str, api_client: Any) -> list[str]:
    """Delete the worker Deployments behind a cluster Service URL (found by the Service's
    selector) and the Service itself; returns the deleted Deployments' names."""
    from kubernetes import client

    located = service_from_endpoint(endpoint)
    if located is None:
        raise DeployError(f"{endpoint} is not a cluster Service URL")
    service_name, namespace = located
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    try:
        service = core.read_namespaced_service(service_name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return []
        raise DeployError(f"reading Service {namespace}/{service_name}: {exc.status}") from exc
    selector = (service.spec.selector or {}) if service.spec else {}
    if selector.get("app.kubernetes.io/name") != WORKER_APP:
        raise DeployError(f"Service {namespace}/{service_name} does not select strata workers")
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    found = apps.list_namespaced_deployment(namespace, label_selector=label_selector)
    names = [d.metadata.name for d in found.items]
    for name in names:
        delete_deployment(name, namespace, api_client)
    if service_name not in names:
        delete_deployment(service_name, namespace, api_client)
    return names


def release_patches(
    deployments: list[dict[str, Any]], model: str, model_path: str, version: str
) -> dict[str, dict[str, Any]]:
    """Pure: the strategic merge patch per Deployment of a serving-chart release that moves it
    to ``model_path`` at ``version`` (frontend and workers; others, e.g. the planner, as is).

    Only ``--model=`` in the container's args and the version label change; a release that
    serves another model is refused (``DeployError``).
    """
    label = _label_value(version)
    patches = {}
    for deployment in deployments:
        meta = deployment["metadata"]
        if meta["labels"].get(CHART_COMPONENT_LABEL) not in RELEASE_COMPONENTS:
            continue
        served = meta["labels"].get(LABEL_MODEL)
        if served != _label_value(model):
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


def promote_release(
    release: str,
    params: PublishParams,
    version: str,
    staged_dir: Path,
    *,
    namespace: str,
    api_client: Any,
    timeout_s: float,
    poll_s: float = 2.0,
) -> list[str]:
    """Move serving-chart release ``release`` to ``version`` (staged at ``staged_dir``) and wait
    for its rollout; returns the patched Deployments' names."""
    from kubernetes import client

    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    selector = f"{CHART_NAME_LABEL}=strata,{RELEASE_LABEL}={release}"
    try:
        found = apps.list_namespaced_deployment(namespace, label_selector=selector)
    except client.ApiException as exc:
        raise DeployError(f"listing Deployments {selector} in {namespace}: {exc.status}") from exc
    deployments = [api_client.sanitize_for_serialization(d) for d in found.items]
    patches = release_patches(
        deployments, params.name, model_path_on_mount(params, staged_dir), version
    )
    workers = [d["metadata"]["name"] for d in deployments
               if d["metadata"]["labels"].get(CHART_COMPONENT_LABEL) == "worker"]  # fmt: skip
    if not workers:
        raise DeployError(
            f"no worker Deployments of release {release!r} in namespace {namespace} "
            f"(labels {selector}): install the serving chart first"
        )
    label = {"metadata": {"labels": {LABEL_VERSION: _label_value(version)}}}
    try:
        for name, patch in patches.items():
            apps.patch_namespaced_deployment(
                name, namespace, patch, _content_type=STRATEGIC_MERGE_PATCH
            )
        for name in workers:  # the chart names each pool's Service after its Deployment
            core.patch_namespaced_service(name, namespace, label,
                                          _content_type=STRATEGIC_MERGE_PATCH)  # fmt: skip
    except client.ApiException as exc:
        raise DeployError(f"patching release {release!r}: {exc.status} {exc.reason}") from exc
    logger.info("release %s: %s moving to version %s", release, ", ".join(patches), version)
    for name in patches:
        wait_ready(name, namespace, timeout_s, api_client, poll_s=poll_s)
    # Helm's next upgrade of the release re-applies its values (a three-way merge with the live
    # objects): they must name this version too, or that upgrade rolls it back.
    logger.warning(
        "release %s serves version %s; set it in the release's values too (helm upgrade %s ... "
        "--set model.path=%s --set model.version=%s), else its next upgrade reverts it",
        release, version, release, model_path_on_mount(params, staged_dir), _label_value(version),
    )  # fmt: skip
    return list(patches)


def deploy(
    params: PublishParams,
    version: str,
    staged_dir: Path,
    *,
    namespace: str,
    image: str,
    pvc_name: str,
    gpu: bool,
    api_client: Any,
    timeout_s: float,
    poll_s: float = 2.0,
) -> tuple[str, str]:
    """Render, apply and await the version's workers; returns ``(name, endpoint)``."""
    manifests = render_worker_manifests(
        params, version, staged_dir, namespace=namespace, image=image, pvc_name=pvc_name, gpu=gpu
    )
    apply_manifests(manifests, api_client=api_client)
    name = manifests[0]["metadata"]["name"]
    wait_ready(name, namespace, timeout_s, api_client, poll_s=poll_s)
    return name, endpoint_for(name, namespace)


def make_api_client() -> Any:
    """An ``ApiClient`` from the pod's service account in a cluster, else from kubeconfig."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the client reads it once, at import.
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
            )
        except (config.ConfigException, OSError) as exc:
            raise DeployError(
                f"no Kubernetes credentials: not in a cluster and no usable kubeconfig ({exc})"
            ) from exc
    return client.ApiClient(configuration)
