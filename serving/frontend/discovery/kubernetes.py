"""Discovery from Kubernetes EndpointSlices, watched through the official ``kubernetes`` client.

EndpointSlices carry their Service's labels, so a worker Service labelled
``app.kubernetes.io/component=worker`` (the selector, ``--kube-selector``),
``strata.dev/model=<served name>``, ``strata.dev/role=prefill|decode|both`` and optionally
``strata.dev/model-version`` describes every pod behind it. Ports by name: ``http`` (required),
``kv-events`` and ``kv-replay`` (optional; else the worker's ``/health`` tells). Only ready
endpoints are workers. RBAC: ``get``, ``list``, ``watch`` on ``endpointslices`` in the namespace.

The client is synchronous: a daemon thread lists, then watches from the list's
resourceVersion (resuming after each ``timeoutSeconds``, re-listing after a 410 Gone or an
error), and hands every new set of workers to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from serving.frontend.discovery import Publish
from serving.frontend.workers import ROLES, WorkerSpec

logger = logging.getLogger(__name__)

DEFAULT_SELECTOR = "app.kubernetes.io/component=worker"
MODEL_LABEL = "strata.dev/model"
ROLE_LABEL = "strata.dev/role"
VERSION_LABEL = "strata.dev/model-version"
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace() -> str:
    """The pod's own namespace in a cluster, else ``default``."""
    try:
        return _NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def specs_from_slices(slices: list[Any]) -> list[WorkerSpec]:
    """Workers from ``V1EndpointSlice`` objects: one per ready endpoint address. Pure."""
    specs: dict[str, WorkerSpec] = {}
    for item in slices:
        labels = item.metadata.labels or {}
        ports = {p.name: p.port for p in item.ports or [] if p.name and p.port}
        if "http" not in ports:
            logger.warning("EndpointSlice %s has no port named 'http': skipped",
                           item.metadata.name)  # fmt: skip
            continue
        role = labels.get(ROLE_LABEL)
        role = role if role in ROLES else None
        for endpoint in item.endpoints or []:
            ready = endpoint.conditions.ready if endpoint.conditions is not None else None
            if ready is False or not endpoint.addresses:  # unset means ready (the API's rule)
                continue
            host = endpoint.addresses[0]
            host = f"[{host}]" if item.address_type == "IPv6" else host
            url = f"http://{host}:{ports['http']}"
            kv = f"tcp://{host}:{ports['kv-events']}" if "kv-events" in ports else None
            replay = f"tcp://{host}:{ports['kv-replay']}" if "kv-replay" in ports else None
            target = endpoint.target_ref.name if endpoint.target_ref is not None else None
            specs[url] = WorkerSpec(url, kv, replay, target, role, labels.get(MODEL_LABEL),
                                    labels.get(VERSION_LABEL))  # fmt: skip
    return list(specs.values())


class KubernetesSource:
    """EndpointSlices of ``namespace`` matching ``selector`` -> worker sets."""

    name = "kubernetes"

    def __init__(
        self,
        namespace: str | None = None,
        selector: str = DEFAULT_SELECTOR,
        *,
        api_client: Any = None,
        watch_timeout_s: int = 60,
        retry_s: float = 1.0,
    ) -> None:
        self.namespace = namespace or default_namespace()
        self.selector = selector
        self.api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[WorkerSpec]] = asyncio.Queue()
        stop = threading.Event()

        def hand_over(specs: list[WorkerSpec]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, specs)

        thread = threading.Thread(target=self._watch_forever, args=(hand_over, stop),
                                  name="kube-discovery", daemon=True)  # fmt: skip
        thread.start()
        try:
            while True:
                specs = await queue.get()
                while not queue.empty():  # only the newest set matters
                    specs = queue.get_nowait()
                await publish(specs)
        finally:
            stop.set()

    def _watch_forever(self, hand_over: Any, stop: threading.Event) -> None:
        from kubernetes import client, watch

        api = client.DiscoveryV1Api(self.api_client or _default_api_client())
        while not stop.is_set():
            try:
                listed = api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=self.selector
                )
                slices = {s.metadata.name: s for s in listed.items}
                hand_over(specs_from_slices(list(slices.values())))
                self._watch(api, watch.Watch(), slices, listed.metadata.resource_version,
                            hand_over, stop)  # fmt: skip
            except Exception as exc:  # the API server away, 410 Gone, a bad object: re-list
                gone = getattr(exc, "status", None) == 410
                (logger.info if gone else logger.warning)(
                    "EndpointSlice watch in %s ended (%s); listing again", self.namespace,
                    "410 Gone" if gone else repr(exc),
                )  # fmt: skip
                if not gone:
                    stop.wait(self.retry_s)

    def _watch(self, api: Any, watcher: Any, slices: dict[str, Any], version: str,
               hand_over: Any, stop: threading.Event) -> None:  # fmt: skip
        """Follow changes from ``version`` until ``stop``; raises to re-list."""
        while not stop.is_set():
            stream = watcher.stream(
                api.list_namespaced_endpoint_slice,
                self.namespace,
                label_selector=self.selector,
                resource_version=version,
                timeout_seconds=self.watch_timeout_s,
                allow_watch_bookmarks=True,
            )
            for event in stream:
                if stop.is_set():
                    watcher.stop()
                    return
                obj = event["object"]
                if event["type"] != "BOOKMARK":
                    if event["type"] == "DELETED":
                        slices.pop(obj.metadata.name, None)
                    else:
                        slices[obj.metadata.name] = obj
                    hand_over(specs_from_slices(list(slices.values())))
            version = watcher.resource_version or version


def _default_api_client() -> Any:
    """In a pod: the service account; elsewhere: the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
