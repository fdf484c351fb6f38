"""The engine's request: prompt, sampling settings and progress; no I/O, no torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from serving.engine.kv_transfer import RemotePrefill


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    # Blocks allocated, remote prefill KV being pulled into them (disaggregated decode).
    WAITING_FOR_REMOTE_KVS = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after PREEMPTED is a finished state.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: RequestStatus) -> str | None:
        """OpenAI's finish_reason for a finished status, None while unfinished."""
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class SamplingParams:
    """What to generate and when to stop.

    ``temperature == 0`` means greedy. ``top_k=None`` and ``top_p=1.0`` disable those filters.
    ``logprobs=None`` returns no log-probabilities; ``logprobs=k`` returns the sampled token's and
    the ``k`` most likely ones. Stop strings are checked on text by the output processor; stop
    token ids, EOS and ``max_tokens`` are checked by the scheduler.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(slots=True, eq=False)
class Request:
    """One generation request as the scheduler sees it.

    Invariant: ``num_computed_tokens <= num_tokens``; the KV cache holds exactly the first
    ``num_computed_tokens`` tokens of ``all_token_ids`` in this request's blocks.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time_s: float = field(default_factory=time.monotonic)
    kv_transfer_params: dict[str, Any] | None = None
    # Set from kv_transfer_params on a decode worker; cleared once the pull was planned.
    remote_prefill: RemotePrefill | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache when the request was first scheduled (-> usage).
    num_cached_tokens: int | None = None
    num_preemptions: int = 0
    # Chained hashes of this request's full blocks, extended as blocks fill.
    block_hashes: list[int] = field(default_factory=list)
    # Set by the scheduler when the request first runs, and at the first output token.
    first_scheduled_time_s: float | None = None
    stop_reason: int | str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without copying the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)
