"""What the scheduler hands a model runner each step, and what comes back. Plain values only."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.engine.kv_offload import KVOnboard
from serving.engine.kv_transfer import KVPull
from serving.engine.request import SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step.

    The runner computes KV for ``token_ids`` at positions ``start_pos .. start_pos+len-1`` and
    writes it into ``block_ids`` (the request's whole block table: position ``p`` lives in block
    ``block_ids[p // block_size]`` at offset ``p % block_size``). Attention for these tokens reads
    every position ``< start_pos + len(token_ids)``. When ``sample`` is set, the last token's
    logits are sampled into one new token.
    """

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    # Tokens generated so far, for the sampler's per-request state (seeded generators).
    num_output_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length after this step: cached/computed tokens plus the new ones."""
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan. ``seqs`` keeps the scheduler's order (running first, then new)."""

    seqs: list[ScheduledSeq]
    # Requests that left since the last step: the runner drops their per-request state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted this step (their KV is gone; they will be recomputed).
    preempted_req_ids: set[str] = field(default_factory=set)
    # Fraction of KV blocks in use after scheduling (0..1), for timing models.
    kv_usage: float = 0.0
    # Remote prefill KV to pull before these requests can run (disaggregated decode); the
    # owner runs them outside the step and reports back with ``finish_kv_pull``.
    kv_pulls: list[KVPull] = field(default_factory=list)
    # Lower-tier KV to copy in before these requests can run (``finish_kv_onboard``).
    kv_onboards: list[KVOnboard] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of the sampled token and of the ``k`` most likely tokens."""

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens for every sequence with ``sample`` set.

    ``step_duration_s`` is the modelled compute time of the step (the mock engine's timing model);
    real runners leave it ``None`` because their time is the wall clock.
    """

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    step_duration_s: float | None = None
