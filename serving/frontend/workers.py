"""The frontend's view of its workers: endpoints, health, and KV-event subscriptions.

Workers join statically (``strata serve`` starts them, ``--worker-url``) or at run time through
the registration API; they leave when deregistered or when health checks fail. A worker's KV
events are read by a subscriber thread and applied to the router on the event loop, so index
updates and routing queries never race.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import zmq

from serving.protocol.kv_events import KVEventBatch
from serving.router.subscriber import KVEventSubscriber, KVEventSubscriberThread
from serving.vllm_engine.discovery import probe_vllm

logger = logging.getLogger(__name__)


ROLES = ("prefill", "decode", "both")
DEFAULT_VERSION = "default"
_SPEC_OPTIONS = ("kv", "replay", "id", "role", "model", "version")


class WorkerRegistrationError(ValueError):
    """A worker could not be added (unreachable, wrong model, bad block size...)."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to reach a worker. KV endpoints are discovered from a Strata worker's /health."""

    url: str
    kv_events_endpoint: str | None = None
    replay_endpoint: str | None = None
    worker_id: str | None = None
    # prefill | decode | both; None: from the worker's /health (vLLM workers: "both").
    role: str | None = None
    # The served model it belongs to; None: the name the worker reports on /v1/models.
    model: str | None = None
    # The model version it serves (one router index and pool per version); None: "default".
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """``URL[;kv=tcp://h:p][;replay=tcp://h:p][;id=name][;role=R][;model=M][;version=V]``.

        The ``--worker-url`` format; ``role`` is needed for a stock vLLM worker started as a
        KV producer or consumer (Strata workers report theirs on /health).
        """
        url, *options = [part.strip() for part in text.split(";")]
        if not url.startswith(("http://", "https://")):
            raise WorkerRegistrationError(f"worker url {url!r} must start with http(s)://")
        values: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in _SPEC_OPTIONS:
                raise WorkerRegistrationError(
                    f"worker option {option!r}: expected one of "
                    + ", ".join(f"{k}=..." for k in _SPEC_OPTIONS)
                )
            values[key] = value
        role = values.get("role")
        if role is not None and role not in ROLES:
            raise WorkerRegistrationError(f"worker role {role!r}: expected one of {ROLES}")
        return cls(url.rstrip("/"), values.get("kv"), values.get("replay"), values.get("id"), role,
                   values.get("model"), values.get("version"))  # fmt: skip


@dataclass(slots=True)
class Worker:
    worker_id: str
    url: str
    model_name: str
    kv_events_endpoint: str | None
    replay_endpoint: str | None
    role: str = "both"
    served_model: str = ""  # the frontend's model name it serves (may differ from model_name)
    version: str = DEFAULT_VERSION
    healthy: bool = True
    # Scale-down (the planner): no new requests; the streams it has go on. See drain().
    draining: bool = False
    num_health_failures: int = 0
    num_event_batches: int = 0
    num_lost_batches: int = 0  # already counted in the metrics
    last_event_s: float | None = None
    num_requests: int = 0
    first_request_s: float | None = None
    warned_no_events: bool = False
    subscriber: KVEventSubscriberThread | None = field(default=None, repr=False)

    @property
    def publishes_events(self) -> bool:
        return self.kv_events_endpoint is not None


EventSink = Callable[[str, KVEventBatch], None]


@dataclass(frozen=True, slots=True)
class WorkerProbe:
    """What a worker told us about itself when it was probed."""

    model_name: str
    role: str
    kv_events_endpoint: str | None
    replay_endpoint: str | None


def check_kv_endpoint(endpoint: str | None, what: str) -> None:
    """A ZeroMQ endpoint a subscriber can connect to: ``tcp://HOST:PORT`` or ``ipc://PATH``."""
    if endpoint is None:
        return
    scheme, sep, rest = endpoint.partition("://")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        valid = bool(colon and host) and port.isdigit() and 0 < int(port) < 65536
    else:
        valid = scheme == "ipc" and bool(sep and rest)
    if not valid:
        raise WorkerRegistrationError(
            f"{what} {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH"
        )


async def probe_worker(http: httpx.AsyncClient, spec: WorkerSpec, block_size: int) -> WorkerProbe:
    """Ask a worker for its model (``/v1/models``), role, block size and KV-event endpoints
    (a Strata worker's ``/health``); the spec's values win over the worker's.

    Raises ``WorkerRegistrationError`` for an unreachable worker or one that does not fit.
    """
    if not spec.url.startswith(("http://", "https://")):
        raise WorkerRegistrationError(f"worker url {spec.url!r} must start with http(s)://")
    check_kv_endpoint(spec.kv_events_endpoint, "kv_events_endpoint")
    check_kv_endpoint(spec.replay_endpoint, "replay_endpoint")
    try:
        models = (await http.get(f"{spec.url}/v1/models", timeout=10)).json()
        model_name = models["data"][0]["id"]
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, IndexError,
            TypeError) as exc:  # fmt: skip
        raise WorkerRegistrationError(f"worker {spec.url}: /v1/models failed: {exc}") from exc
    kv_endpoint, replay_endpoint = spec.kv_events_endpoint, spec.replay_endpoint
    try:
        health = (await http.get(f"{spec.url}/health", timeout=10)).json()
    except (httpx.HTTPError, ValueError):
        health = {}  # vLLM's /health has an empty body
    if not isinstance(health, dict):
        health = {}
    worker_block_size = health.get("block_size")
    host = urlsplit(spec.url).hostname or "127.0.0.1"
    if worker_block_size is None:  # stock vLLM: /kv_event_sources and vllm:cache_config_info
        vllm = await probe_vllm(http, spec.url, host)
        worker_block_size = vllm.block_size
        if kv_endpoint is None and vllm.kv_events is not None:
            kv_endpoint = vllm.kv_events.endpoint
            replay_endpoint = replay_endpoint or vllm.kv_events.replay_endpoint
    if worker_block_size is not None and worker_block_size != block_size:
        raise WorkerRegistrationError(
            f"worker {spec.url} uses KV block size {worker_block_size}, the router {block_size}"
        )
    if kv_endpoint is None and health.get("kv_events_port"):
        kv_endpoint = f"tcp://{host}:{health['kv_events_port']}"
    if replay_endpoint is None and health.get("kv_events_replay_port"):
        replay_endpoint = f"tcp://{host}:{health['kv_events_replay_port']}"
    role = spec.role or health.get("role") or "both"
    if role not in ROLES:
        raise WorkerRegistrationError(f"worker {spec.url} reports unknown role {role!r}")
    return WorkerProbe(model_name, role, kv_endpoint, replay_endpoint)


class WorkerPool:
    """Registered workers by id; owns their subscriber threads. Used from the event loop."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        on_events: EventSink,
        on_added: Callable[[Worker], None],
        on_removed: Callable[[Worker], None],
        *,
        block_size: int,
    ) -> None:
        self.http = http
        self.on_events = on_events
        self.on_added = on_added
        self.on_removed = on_removed
        self.block_size = block_size
        self.workers: dict[str, Worker] = {}
        self._next_index = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def healthy_ids(self) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.healthy]

    def routable_ids(self) -> list[str]:
        """Healthy workers that take new requests (a draining one only finishes its own)."""
        return [w.worker_id for w in self.workers.values() if w.healthy and not w.draining]

    def decode_ids(self) -> list[str]:
        """Routable workers that serve client streams (decode and aggregated ones).

        When only prefill workers are routable they serve whole requests rather than none.
        """
        ids = [i for i in self.routable_ids() if self.workers[i].role != "prefill"]
        return ids or self.routable_ids()

    def prefill_ids(self) -> list[str]:
        return [i for i in self.routable_ids() if self.workers[i].role == "prefill"]

    def drain(self, worker_id: str) -> Worker | None:
        """Route no new request to the worker; its streams go on, and migrate to others if
        it stops before they end (the planner's scale-down: drain, wait, stop, deregister)."""
        worker = self.workers.get(worker_id)
        if worker is not None and not worker.draining:
            worker.draining = True
            logger.info("worker %s draining: no new requests", worker_id)
        return worker

    async def register(self, spec: WorkerSpec) -> Worker:
        """Probe the worker, subscribe to its events, and add it. Idempotent per URL."""
        self._loop = asyncio.get_running_loop()
        for worker in self.workers.values():
            if worker.url == spec.url:
                return worker
        probe = await probe_worker(self.http, spec, self.block_size)
        return await self.add(spec, probe)

    async def add(self, spec: WorkerSpec, probe: WorkerProbe) -> Worker:
        """Add a probed worker and subscribe to its KV events; returns once the events its
        publisher still buffers are replayed into the index (a restarted frontend routes
        with the cache state it had)."""
        self._loop = asyncio.get_running_loop()
        worker_id = spec.worker_id or f"worker-{self._next_index}"
        self._next_index += 1
        if worker_id in self.workers:
            raise WorkerRegistrationError(f"worker id {worker_id!r} is already registered")
        worker = Worker(worker_id, spec.url, probe.model_name, probe.kv_events_endpoint,
                        probe.replay_endpoint, probe.role, spec.model or probe.model_name,
                        spec.version or DEFAULT_VERSION)  # fmt: skip
        self.workers[worker_id] = worker
        self.on_added(worker)
        try:
            await self._subscribe(worker)
        except zmq.ZMQError as exc:  # an endpoint ZeroMQ refuses: add nothing
            self.deregister(worker_id)
            raise WorkerRegistrationError(
                f"worker {spec.url}: KV events at {worker.kv_events_endpoint}: {exc}"
            ) from exc
        logger.info(
            "worker %s added: %s (model %s, role %s, KV events %s)",
            worker_id,
            spec.url,
            probe.model_name,
            probe.role,
            probe.kv_events_endpoint or "none",
        )
        return worker

    def deregister(self, worker_id: str) -> Worker | None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        self._unsubscribe(worker)
        self.on_removed(worker)
        logger.info("worker %s removed (%s)", worker_id, worker.url)
        return worker

    def mark_failed(self, worker_id: str, reason: str) -> None:
        """A request saw the worker fail: stop routing to it and drop its blocks at once."""
        worker = self.workers.get(worker_id)
        if worker is None or not worker.healthy:
            return
        logger.warning("worker %s marked unhealthy: %s", worker_id, reason)
        worker.healthy = False
        self._unsubscribe(worker)
        self.on_removed(worker)

    async def check_health(self, max_failures: int) -> None:
        """One round of health checks; a worker failing ``max_failures`` in a row is removed."""
        for worker in list(self.workers.values()):
            try:
                response = await self.http.get(f"{worker.url}/health", timeout=5)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                worker.num_health_failures = 0
                if not worker.healthy:
                    logger.info("worker %s is healthy again", worker.worker_id)
                    worker.healthy = True
                    self.on_added(worker)
                    await self._subscribe(worker)
                continue
            worker.num_health_failures += 1
            if worker.healthy:
                self.mark_failed(worker.worker_id, "health check failed")
            if worker.num_health_failures >= max_failures:
                self.deregister(worker.worker_id)

    def close(self) -> None:
        for worker in self.workers.values():
            self._unsubscribe(worker)

    # -- events --------------------------------------------------------------------------------

    async def _subscribe(self, worker: Worker) -> None:
        """Connect to the worker's KV events, replay what its publisher buffers (from seq 0)
        into the index, then follow the live stream in a thread."""
        if worker.kv_events_endpoint is None or self._loop is None:
            return
        loop = self._loop
        worker_id = worker.worker_id
        subscriber = KVEventSubscriber(worker.kv_events_endpoint, worker.replay_endpoint)
        # The SUB socket is connected: live batches wait in it while the replay runs, and the
        # subscriber drops those the replay already delivered.
        replayed = await asyncio.to_thread(subscriber.catch_up)
        if self.workers.get(worker_id) is not worker or not worker.healthy:
            subscriber.close()  # left (or failed) while replaying
            return
        for _, batch in replayed:
            self._apply(worker_id, batch)

        def forward(seq: int, batch: KVEventBatch) -> None:
            loop.call_soon_threadsafe(self._apply, worker_id, batch)

        worker.num_lost_batches = 0  # a new subscriber counts from zero
        worker.subscriber = KVEventSubscriberThread(subscriber, forward, catch_up=False)
        worker.subscriber.start()

    def _unsubscribe(self, worker: Worker) -> None:
        if worker.subscriber is not None:
            worker.subscriber.stop()
            worker.subscriber = None

    def _apply(self, worker_id: str, batch: KVEventBatch) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or not worker.healthy:
            return  # late batch from a worker that left
        worker.num_event_batches += 1
        worker.last_event_s = time.monotonic()
        self.on_events(worker_id, batch)
