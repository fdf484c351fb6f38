"""The worker's side of disaggregation: a transport over the engine's KV pool.

Prefill role: the engine leases a finished prefill request's blocks; ``response_params`` adds
where to pull them from (vLLM's ``remote_engine_id``/``remote_host``/``remote_port``, plus our
transport's metadata under ``strata_transport``). Releases arrive as transport notifications
(``poll_released``), as vLLM's decode side sends them: ``b"<remote_request_id>:<tp_size>"``.

Decode role: ``run_pull`` executes one ``KVPull`` (connect, one transfer for all blocks,
notify) on a worker thread; failure is reported, never raised, and the engine then prefills
locally. The mock engine has no real KV: it registers a small stand-in pool (so the protocol,
leases and notifications are real) and adds the modelled time
``tokens * kv_bytes_per_token / bandwidth``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from serving.engine.kv_transfer import KVPull
from serving.transfer import BlockLayout, KVTransport, make_transport

logger = logging.getLogger(__name__)

WorkerRole = Literal["prefill", "decode", "both"]
# Bytes per block of the mock engine's stand-in pool: enough to move real bytes, cheaply.
_MOCK_BLOCK_BYTES = 64
TRANSPORT_METADATA_KEY = "strata_transport"
LEASE_EXPIRY_KEY = "remote_lease_expires_unix_s"
# A pull must not start this close to the lease's end: the prefill worker may reuse the blocks
# as soon as it expires, and bytes read from reused blocks would be silently wrong.
LEASE_MARGIN_S = 1.0


@dataclass(frozen=True, slots=True)
class PullResult:
    request_id: str
    succeeded: bool
    num_bytes: int
    duration_s: float
    error: str | None = None


class KVConnector:
    """Owns one ``KVTransport`` bound to the engine's pool; thread-safe as the transport is."""

    def __init__(
        self,
        transport: KVTransport,
        layout: BlockLayout,
        *,
        engine_id: str | None = None,
        modelled_bytes_per_token: int | None = None,
        modelled_bandwidth_bytes_per_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.transport = transport
        self.layout = layout
        self.engine_id = engine_id or transport.name
        self._modelled_bytes_per_token = modelled_bytes_per_token
        self._modelled_bandwidth = modelled_bandwidth_bytes_per_s
        self._sleep = sleep

    @property
    def kind(self) -> str:
        return self.transport.kind

    @property
    def is_fallback(self) -> bool:
        choice = self.transport.choice
        return bool(choice and choice.is_fallback)

    # -- prefill side --------------------------------------------------------------------------

    def response_params(self, engine_params: dict[str, Any]) -> dict[str, Any]:
        """The prefill response's ``kv_transfer_params``: the engine's plus where we are."""
        meta = self.transport.metadata()
        lease_s = engine_params.get("remote_lease_s")
        expiry = {LEASE_EXPIRY_KEY: time.time() + float(lease_s)} if lease_s else {}
        return {
            **engine_params,
            **expiry,
            "remote_engine_id": self.engine_id,
            "remote_host": meta.get("host"),
            "remote_port": meta.get("port"),
            TRANSPORT_METADATA_KEY: meta,
        }

    def poll_released(self) -> list[str]:
        """Request ids whose blocks a decode worker has pulled (or given up on)."""
        released: list[str] = []
        for _sender, message in self.transport.poll_notifications():
            text = message.decode("utf-8", "replace")
            # vLLM: "<request id>:<tp size>"; request ids may themselves contain ':'.
            request_id, sep, tail = text.rpartition(":")
            released.append(request_id if sep and tail.isdigit() else text)
        return released

    # -- decode side ---------------------------------------------------------------------------

    def run_pull(self, pull: KVPull) -> PullResult:
        """Pull ``pull``'s blocks and release the remote lease; never raises."""
        started_s = time.monotonic()
        params = pull.source.params
        meta = params.get(TRANSPORT_METADATA_KEY) or {
            "kind": self.transport.kind,
            "name": pull.source.engine_id,
            "host": params.get("remote_host"),
            "port": params.get("remote_port"),
        }
        try:
            expires_s = params.get(LEASE_EXPIRY_KEY)
            if expires_s is not None and time.time() > float(expires_s) - LEASE_MARGIN_S:
                raise TimeoutError(
                    f"the prefill lease has expired or ends within {LEASE_MARGIN_S} s"
                )
            peer = self.transport.connect(meta)
            num_bytes = 0
            if pull.remote_block_ids:
                self.transport.pull(peer, pull.remote_block_ids, pull.local_block_ids)
                num_bytes = self._bytes(pull)
                modelled_s = self._modelled_s(pull)
                if modelled_s > 0:
                    self._sleep(modelled_s)
            self.transport.notify(peer, f"{pull.source.request_id}:1".encode())
        except Exception as exc:  # any failure: the engine prefills locally instead
            logger.warning(
                "KV pull for %s from %s (%s:%s) failed, prefilling locally: %s",
                pull.request_id,
                pull.source.engine_id,
                params.get("remote_host"),
                params.get("remote_port"),
                exc,
            )
            return PullResult(
                pull.request_id, False, 0, time.monotonic() - started_s, error=str(exc)
            )
        return PullResult(pull.request_id, True, num_bytes, time.monotonic() - started_s)

    def _bytes(self, pull: KVPull) -> int:
        if self._modelled_bytes_per_token:
            return pull.num_tokens * self._modelled_bytes_per_token
        return len(pull.remote_block_ids) * self.layout.block_bytes * self.layout.num_regions

    def _modelled_s(self, pull: KVPull) -> float:
        if not (self._modelled_bytes_per_token and self._modelled_bandwidth):
            return 0.0
        return pull.num_tokens * self._modelled_bytes_per_token / self._modelled_bandwidth

    def close(self) -> None:
        self.transport.close()


def make_connector(
    kind: Literal["nixl", "tcp", "auto"],
    *,
    kv_cache: torch.Tensor | None,
    num_blocks: int,
    host: str,
    port: int,
    modelled_bytes_per_token: int | None = None,
    modelled_bandwidth_bytes_per_s: float | None = None,
) -> KVConnector:
    """A connector over ``kv_cache`` (the engine's pool), or a stand-in pool for the mock.

    Pools are block-major (blocks on axis 0, each block one contiguous run), as the engine's
    ``KVPool`` is.
    """
    if kv_cache is None:  # the mock engine: real protocol, tiny bytes, modelled time
        kv_cache = torch.zeros((num_blocks, _MOCK_BLOCK_BYTES), dtype=torch.uint8)
    layout = BlockLayout.block_major(kv_cache.shape[0], kv_cache[0].nbytes)
    name = f"strata-{uuid.uuid4().hex[:12]}"
    transport = make_transport(kind, name=name, host=host, port=port)
    try:
        transport.register_pool(kv_cache, layout)
    except Exception:
        transport.close()
        raise
    return KVConnector(
        transport,
        layout,
        engine_id=name,
        modelled_bytes_per_token=modelled_bytes_per_token,
        modelled_bandwidth_bytes_per_s=modelled_bandwidth_bytes_per_s,
    )
