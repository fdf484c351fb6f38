"""Conditional disaggregation: prefill on the decode worker, or on a prefill worker? Pure.

The rule (DESIGN.md, as Dynamo's conditional disaggregation): a request is prefilled by the
decode worker the router chose when the part of its prompt that worker does *not* have cached
is short — under ``max_local_prefill_tokens`` (default 2,048) **and** under
``max_local_prefill_fraction`` (default 70%) of the prompt — or when no prefill worker is
healthy. Otherwise a prefill worker (the lowest-cost one under the same cost function) computes
the prompt and the decode worker pulls its KV blocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_MAX_LOCAL_PREFILL_TOKENS = 2048
DEFAULT_MAX_LOCAL_PREFILL_FRACTION = 0.7


class DisaggDecision(enum.StrEnum):
    """Where a request's prompt is computed; the ``decision`` label of the router metric."""

    REMOTE = "remote"  # on a prefill worker, KV pulled by the decode worker
    LOCAL_SHORT = "local_short"  # the uncached part is short: the decode worker prefills
    LOCAL_NO_PREFILL_WORKER = "local_no_prefill_worker"  # none healthy
    LOCAL_PREFILL_FAILED = "local_prefill_failed"  # the prefill worker failed or returned no KV
    AGGREGATED = "aggregated"  # no prefill workers configured at all

    @property
    def is_remote(self) -> bool:
        return self is DisaggDecision.REMOTE


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    max_local_prefill_tokens: int = DEFAULT_MAX_LOCAL_PREFILL_TOKENS
    max_local_prefill_fraction: float = DEFAULT_MAX_LOCAL_PREFILL_FRACTION

    def __post_init__(self) -> None:
        if self.max_local_prefill_tokens < 0:
            raise ValueError("max_local_prefill_tokens must be >= 0")
        if not 0 <= self.max_local_prefill_fraction <= 1:
            raise ValueError("max_local_prefill_fraction must be in [0, 1]")


def decide(
    num_prompt_tokens: int,
    num_cached_tokens: int,
    num_prefill_workers: int,
    config: DisaggConfig,
) -> DisaggDecision:
    """Where to prefill a prompt the chosen decode worker has ``num_cached_tokens`` of."""
    uncached = max(num_prompt_tokens - num_cached_tokens, 0)
    short = (
        uncached < config.max_local_prefill_tokens
        and uncached < config.max_local_prefill_fraction * num_prompt_tokens
    )
    if short:
        return DisaggDecision.LOCAL_SHORT
    if num_prefill_workers == 0:
        return DisaggDecision.LOCAL_NO_PREFILL_WORKER
    return DisaggDecision.REMOTE


def prefill_request_params() -> dict[str, object]:
    """``kv_transfer_params`` of the request sent to a prefill worker (vLLM's exact shape)."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
