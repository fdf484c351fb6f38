"""deploy, Kubernetes target: render, apply and await a version's worker Deployment and Service.

One version of one model is one Deployment of ``strata worker`` pods plus one ClusterIP Service,
both named ``strata-worker-<model>-v<version>`` and labelled with the model and version:

    Service <name> (http 8000, kv-events 5557, kv-replay 5558)
        '--selects--> Deployment <name> --> pods: strata worker --model /model-cache/<staged>
                                                  (model-cache PVC mounted read-only)

The manifests come from ``k8s_manifests`` (pure: dicts in, dicts out); ``apply_manifests``,
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

import logging
import os
import time
from pathlib import Path
from typing import Any

from workflows.pipeline import PublishParams
from workflows.steps.deploy import DeployError
from workflows.steps.k8s_manifests import (
    CHART_COMPONENT_LABEL,
    CHART_NAME_LABEL,
    FIELD_MANAGER,
    LABEL_PUBLISH_RUN,
    LABEL_VERSION,
    RELEASE_LABEL,
    WORKER_APP,
    endpoint_for,
    label_value,
    model_path_on_mount,
    release_patches,
    render_worker_manifests,
    service_from_endpoint,
)

logger = logging.getLogger(__name__)

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


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

    selector = f"{LABEL_PUBLISH_RUN}={label_value(run_id)}"
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
    label = {"metadata": {"labels": {LABEL_VERSION: label_value(version)}}}
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
        release, version, release, model_path_on_mount(params, staged_dir), label_value(version),
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
