"""What a stock vLLM worker tells about itself: KV-event endpoints and KV block size.

* ``GET /kv_event_sources`` (vLLM >= 0.32) returns ``{dp_rank: KVEventsConfig}`` with the
  publisher's ``endpoint`` and ``replay_endpoint``. A bound endpoint has a wildcard host
  (``tcp://*:5557``): the subscriber reaches it at the worker's own host.
* ``GET /metrics`` carries ``vllm:cache_config_info``, an info gauge whose labels are the
  engine's cache config, ``block_size`` among them.

The parsers are pure; ``probe_vllm`` does the two GETs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

CACHE_CONFIG_INFO = "vllm:cache_config_info"
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")


@dataclass(frozen=True, slots=True)
class KVEventSource:
    endpoint: str
    replay_endpoint: str | None
    topic: str = ""


@dataclass(frozen=True, slots=True)
class VLLMWorkerInfo:
    """What the probe found; None where the worker did not say."""

    kv_events: KVEventSource | None
    block_size: int | None


def reachable_endpoint(endpoint: str, worker_host: str) -> str:
    """``tcp://*:5557`` -> ``tcp://<worker_host>:5557``; other endpoints unchanged."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme != "tcp":
        return endpoint
    host, colon, port = rest.rpartition(":")
    if not colon or host not in _WILDCARD_HOSTS:
        return endpoint
    if ":" in worker_host and not worker_host.startswith("["):
        worker_host = f"[{worker_host}]"
    return f"tcp://{worker_host}:{port}"


def parse_kv_event_sources(body: Any, worker_host: str) -> KVEventSource | None:
    """The KV-event source of data-parallel rank 0 from ``/kv_event_sources``; None when the
    worker publishes none (events off, the ``null`` publisher, or an empty answer).

    With several data-parallel ranks each rank has its own KV cache and stream; only rank 0's
    is followed (a warning says so).
    """
    if not isinstance(body, dict) or not body:
        return None
    ranks = sorted(body, key=lambda rank: int(rank))
    if len(ranks) > 1:
        logger.warning(
            "vLLM worker at %s has %d data-parallel ranks; the router follows rank %s's KV "
            "events only",
            worker_host,
            len(ranks),
            ranks[0],
        )
    config = body[ranks[0]]
    if not isinstance(config, dict) or not config.get("enable_kv_cache_events"):
        return None
    if config.get("publisher", "zmq") != "zmq" or not config.get("endpoint"):
        return None
    replay = config.get("replay_endpoint")
    return KVEventSource(
        endpoint=reachable_endpoint(config["endpoint"], worker_host),
        replay_endpoint=reachable_endpoint(replay, worker_host) if replay else None,
        topic=config.get("topic") or "",
    )


def parse_block_size(metrics_text: str) -> int | None:
    """``block_size`` of ``vllm:cache_config_info`` in a Prometheus exposition; None if absent."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name != CACHE_CONFIG_INFO:
            continue
        for sample in family.samples:
            value = sample.labels.get("block_size")
            if value and value.isdigit():
                return int(value)
    return None


async def probe_vllm(http: httpx.AsyncClient, url: str, worker_host: str) -> VLLMWorkerInfo:
    """GET ``/kv_event_sources`` and ``/metrics``; a missing or failing one gives None there
    (an older vLLM, or a Strata worker, which says the same on ``/health``)."""
    kv_events = None
    try:
        response = await http.get(f"{url}/kv_event_sources", timeout=10)
        if response.status_code == 200:
            kv_events = parse_kv_event_sources(response.json(), worker_host)
    except (httpx.HTTPError, ValueError):
        pass
    block_size = None
    try:
        response = await http.get(f"{url}/metrics", timeout=10)
        if response.status_code == 200:
            block_size = parse_block_size(response.text)
    except (httpx.HTTPError, ValueError):
        pass
    return VLLMWorkerInfo(kv_events, block_size)


class MixedBlockSizeError(ValueError):
    """Workers of one pool use different KV block sizes (the router indexes one)."""


def worker_block_size(url: str, timeout_s: float = 10.0) -> int | None:
    """A worker's KV block size: a Strata worker's ``/health``, else vLLM's ``/metrics``."""
    try:
        health = httpx.get(f"{url}/health", timeout=timeout_s)
        body = health.json() if health.content else {}
        if isinstance(body, dict) and isinstance(body.get("block_size"), int):
            return body["block_size"]
    except (httpx.HTTPError, ValueError):
        pass
    try:
        metrics = httpx.get(f"{url}/metrics", timeout=timeout_s)
        return parse_block_size(metrics.text) if metrics.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def pool_block_size(urls: list[str], default: int) -> int:
    """The one block size every worker that reports one uses; ``default`` if none reports.

    Raises ``MixedBlockSizeError`` naming each worker's size when they differ.
    """
    sizes = {url: worker_block_size(url) for url in urls}
    known = {url: size for url, size in sizes.items() if size is not None}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{url}: {size}" for url, size in known.items())
        raise MixedBlockSizeError(
            f"workers use different KV block sizes ({listing}); the KV router indexes one "
            "block size per pool: start every worker with the same --block-size"
        )
    return next(iter(known.values()), default)
