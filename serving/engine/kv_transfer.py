"""Disaggregated prefill/decode inside one engine: what vLLM's ``kv_transfer_params`` say.

Pure values; no I/O. The flow is vLLM's NIXL connector in pull mode:

* **prefill side** — a request with ``do_remote_decode: true`` (sent with ``max_tokens=1``)
  runs its prompt, and when it finishes its blocks are *leased* instead of freed
  (``KVLease``); the response carries ``lease_params()``: where the blocks are and which.
* **decode side** — a request with ``do_remote_prefill: true`` and ``remote_block_ids`` gets
  blocks allocated for its prompt, then waits (``WAITING_FOR_REMOTE_KVS``) while the worker
  pulls the remote blocks it does not have in its own prefix cache (``KVPull``). The last
  prompt token is recomputed locally, as vLLM does, so its logits sample the first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# How long a prefill worker keeps a finished request's blocks for the decode worker to pull.
DEFAULT_LEASE_S = 30.0


def wants_remote_decode(params: dict[str, Any] | None) -> bool:
    """True for a prefill request whose KV a decode worker will pull."""
    return bool(params and params.get("do_remote_decode"))


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """Where a decode request's prompt KV waits: parsed once from ``kv_transfer_params``."""

    engine_id: str
    request_id: str
    # Block ids of the first (only) KV-cache group, in prompt order.
    block_ids: tuple[int, ...]
    params: dict[str, Any]

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> RemotePrefill | None:
        """None unless ``do_remote_prefill`` is set with blocks to pull.

        Raises ``ValueError`` naming the field when the object is malformed.
        """
        if not params or not params.get("do_remote_prefill"):
            return None
        raw_ids = params.get("remote_block_ids")
        if raw_ids is None:
            return None
        if not isinstance(raw_ids, list):
            raise ValueError("kv_transfer_params.remote_block_ids must be a list")
        # vLLM >= 0.10 sends one list per KV-cache group; older releases a flat list.
        group = raw_ids[0] if raw_ids and isinstance(raw_ids[0], list) else raw_ids
        if len(raw_ids) > 1 and isinstance(raw_ids[0], list):
            raise ValueError(
                "kv_transfer_params.remote_block_ids has "
                f"{len(raw_ids)} KV-cache groups; this engine has one"
            )
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in group):
            raise ValueError("kv_transfer_params.remote_block_ids must hold block ids (ints >= 0)")
        engine_id = params.get("remote_engine_id")
        request_id = params.get("remote_request_id")
        for name, value in (("remote_engine_id", engine_id), ("remote_request_id", request_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"kv_transfer_params.{name} must be a non-empty string")
        return cls(str(engine_id), str(request_id), tuple(group), dict(params))


@dataclass(frozen=True, slots=True)
class KVPull:
    """Blocks to copy from a prefill worker into this engine's pool, for one request.

    ``remote_block_ids[i]`` lands in ``local_block_ids[i]``; the blocks hold the prompt tokens
    ``[first_token, first_token + num_tokens)``. Empty when the local prefix cache already
    had everything: the worker then only releases the remote lease.
    """

    request_id: str
    source: RemotePrefill
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    first_token: int
    num_tokens: int


@dataclass(slots=True)
class KVLease:
    """Blocks a prefill worker keeps for a decode worker to pull, until ``expires_at_s``."""

    request_id: str
    block_ids: list[int]
    num_tokens: int
    expires_at_s: float


def lease_params(lease: KVLease, lease_s: float) -> dict[str, Any]:
    """The engine's part of the prefill response's ``kv_transfer_params``.

    The keys vLLM's NixlConnector returns, plus ``remote_num_tokens`` (prompt tokens the
    blocks hold) and ``remote_lease_s`` (how long they are held from now); the worker adds
    ``remote_engine_id``, ``remote_host``, ``remote_port`` and the lease's wall-clock expiry.
    """
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_request_id": lease.request_id,
        "remote_block_ids": [list(lease.block_ids)],
        "remote_num_tokens": lease.num_tokens,
        "tp_size": 1,
        "remote_lease_s": lease_s,
    }
