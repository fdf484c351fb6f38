"""What one policy's offline replay measured (``PolicyResult``), and its percentile summaries."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.replay_config import PREFIX_POLICIES


@dataclass
class PolicyResult:
    """What one policy's replay measured; plain values, JSON-ready through ``to_dict``."""

    policy: str
    num_requests: int
    completed: int
    rejected: int
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    router_predicted_cached_tokens: int
    ttft_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    makespan_s: float
    num_preemptions: int
    num_steps: int
    per_worker: dict[str, list[float]]
    sim_wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # Per request id: TTFT in virtual seconds; every inter-token gap. Not in ``to_dict``.
    request_ttft_s: dict[str, float] = field(default_factory=dict, repr=False)
    itl_samples_s: Sequence[float] = field(default_factory=tuple, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def throughput_tok_s(self) -> float:
        return self.output_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    def imbalance(self) -> dict[str, float]:
        """Max/mean and coefficient of variation of prompt tokens and requests per worker."""
        out: dict[str, float] = {}
        for key in ("prompt_tokens", "requests", "busy_s"):
            values = self.per_worker[key]
            mean = statistics.fmean(values)
            out[f"{key}_max_over_mean"] = max(values) / mean if mean else 0.0
            out[f"{key}_cv"] = statistics.pstdev(values) / mean if mean else 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        """Figures only: equal seeds give equal dicts (``sim_wall_s`` is kept apart)."""
        return {
            "policy": self.policy,
            "requests": {
                "total": self.num_requests,
                "completed": self.completed,
                "rejected": self.rejected,
            },
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate": self.hit_rate,
            # Only kv/approx predict a cached prefix; null for the other policies.
            "router_predicted_hit_rate": (
                self.router_predicted_cached_tokens / self.prompt_tokens
                if self.prompt_tokens and self.policy in PREFIX_POLICIES
                else None
            ),
            "output_tokens": self.output_tokens,
            "ttft_s": self.ttft_s,
            "itl_s": self.itl_s,
            "e2e_s": self.e2e_s,
            "makespan_s": self.makespan_s,
            "throughput_tok_s": self.throughput_tok_s,
            # Share of worker-time spent in steps: near 1.0 means the engines are saturated.
            "busy_fraction": (
                sum(self.per_worker["busy_s"]) / (len(self.per_worker["busy_s"]) * self.makespan_s)
                if self.makespan_s > 0
                else 0.0
            ),
            "imbalance": self.imbalance(),
            "per_worker": self.per_worker,
            "num_preemptions": self.num_preemptions,
            "num_engine_steps": self.num_steps,
            **self.extra,
        }


def percentiles(samples: Sequence[float], qs: Sequence[int]) -> dict[str, float]:
    if not len(samples):
        return {f"p{q}": math.nan for q in qs}
    values = np.percentile(np.asarray(samples, dtype=np.float64), qs)
    return {f"p{q}": float(v) for q, v in zip(qs, values, strict=True)}
