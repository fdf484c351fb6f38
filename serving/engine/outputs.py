"""What one engine step reports: new tokens per request and the engine's state. Plain values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.engine.kv_offload import KVOnboard
from serving.engine.kv_transfer import KVPull
from serving.engine.scheduler_output import TokenLogprobs


@dataclass(slots=True)
class RequestTimes:
    """Monotonic timestamps (seconds) of a request's life in the engine."""

    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None


@dataclass(slots=True)
class EngineCoreOutput:
    """New tokens for one request from one step; ``finish_reason`` set on its last output."""

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_output_tokens: int = 0
    times: RequestTimes | None = None
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class SchedulerStats:
    """Engine state after a step, and counters accumulated during it."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


@dataclass(slots=True)
class EngineStepResult:
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    # Modelled compute time of the step (mock engine); None when the wall clock is the truth.
    step_duration_s: float | None = None
    # Remote prefill KV the owner must pull, then report with ``EngineCore.finish_kv_pull``.
    kv_pulls: list[KVPull] = field(default_factory=list)
    # Lower-tier KV to copy in (``EngineCore.finish_kv_onboard``) and tier copies to run
    # (``serving.kvcache.stack.StoreJob``/``DropJob``, reported with ``finish_tier_job``).
    kv_onboards: list[KVOnboard] = field(default_factory=list)
    tier_jobs: list[Any] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        """Nothing computed, produced or started: the unfinished requests wait on something
        outside the engine (a KV pull, a tier onboard, a copy that frees blocks)."""
        return not (
            self.outputs
            or self.kv_pulls
            or self.kv_onboards
            or self.tier_jobs
            or self.stats.num_prompt_tokens
            or self.stats.num_generation_tokens
        )
