"""The mock engine's executor: the real scheduler's plan, with compute replaced by a timing model.

Default model (milliseconds, from DESIGN.md; fitted on an H100 serving a Llama-3-8B-class model):

* prefill_ms(N) = 4.21e-7 * N**2 + 0.0152 * N + 16.5, N = uncached tokens computed in the step
* decode_ms(u)  = -25.74 * u**2 + 54.01 * u + 5.74,    u = KV cache utilisation in [0, 1]

A step with both prefill chunks and decodes costs the sum of both parts. ``speedup`` divides the
result. A measured profile (JSON, see ``TimingProfile.from_json``) replaces the formulas with
piecewise-linear interpolation over measured points.

Tokens are pseudo-random but deterministic per (seed, request id, position), never an EOS id,
so a mock request always runs to ``max_tokens`` (or a stop token id) and reruns reproduce.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from serving.engine.scheduler_output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput


@dataclass(frozen=True, slots=True)
class TimingProfile:
    """Step cost as a function of prefill tokens and KV utilisation."""

    # Polynomial coefficients, highest power first (numpy.polyval order), in milliseconds.
    prefill_coeffs_ms: tuple[float, ...] = (4.21e-7, 0.0152, 16.5)
    decode_coeffs_ms: tuple[float, ...] = (-25.74, 54.01, 5.74)
    # Measured points; when set they replace the polynomials (linear interpolation).
    prefill_points: tuple[tuple[float, float], ...] = ()  # (tokens, ms)
    decode_points: tuple[tuple[float, float], ...] = ()  # (kv usage, ms)

    def prefill_ms(self, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        if self.prefill_points:
            xs, ys = zip(*self.prefill_points, strict=True)
            return float(np.interp(num_tokens, xs, ys))
        return float(np.polyval(self.prefill_coeffs_ms, num_tokens))

    def decode_ms(self, kv_usage: float) -> float:
        usage = min(max(kv_usage, 0.0), 1.0)
        if self.decode_points:
            xs, ys = zip(*self.decode_points, strict=True)
            return float(np.interp(usage, xs, ys))
        return float(np.polyval(self.decode_coeffs_ms, usage))

    @classmethod
    def from_json(cls, path: Path) -> TimingProfile:
        """Load ``{"prefill": [[tokens, ms], ...], "decode": [[kv_usage, ms], ...]}``.

        Either list may instead be ``{"coeffs_ms": [a, b, c]}`` (highest power first).
        Points must be sorted by their first value. Raises ``ValueError`` naming the file.
        """
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                **_part(data, "prefill", "prefill_coeffs_ms", "prefill_points"),
                **_part(data, "decode", "decode_coeffs_ms", "decode_points"),
            )
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"bad timing profile {path}: {exc}") from exc


def _part(data: dict, key: str, coeffs_field: str, points_field: str) -> dict:
    spec = data.get(key)
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return {coeffs_field: tuple(float(c) for c in spec["coeffs_ms"])}
    points = tuple((float(x), float(y)) for x, y in spec)
    if not points or any(a[0] > b[0] for a, b in itertools.pairwise(points)):
        raise ValueError(f"'{key}' points must be a non-empty list sorted by x")
    return {points_field: points}


class MockModelRunner:
    """Implements ``ModelExecutor`` without a model: tokens from a hash, time from a profile."""

    def __init__(
        self,
        *,
        vocab_size: int,
        num_blocks: int,
        block_size: int = 16,
        kv_bytes_per_token: int = 131_072,  # Llama-3-8B in bf16: 2 * 32 layers * 8 * 128 * 2
        profile: TimingProfile | None = None,
        speedup: float = 1.0,
        excluded_token_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        if vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")
        self.vocab_size = vocab_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self.profile = profile or TimingProfile()
        self.speedup = speedup
        self.excluded = frozenset(excluded_token_ids)
        self.seed = seed

    def step_time_s(self, scheduler_output: SchedulerOutput) -> float:
        """Modelled wall time of one step, already divided by ``speedup``."""
        prefill_tokens = 0
        has_decode = False
        for seq in scheduler_output.seqs:
            # One token after existing context costs what a decode token does: a decode, the
            # last prompt token a disaggregated decode worker recomputes after its KV pull,
            # or a 1-token tail of a chunked prefill.
            if seq.num_tokens == 1 and (seq.num_output_tokens > 0 or seq.start_pos > 0):
                has_decode = True
            else:
                prefill_tokens += seq.num_tokens
        ms = self.profile.prefill_ms(prefill_tokens)
        if has_decode:
            ms += self.profile.decode_ms(scheduler_output.kv_usage)
        return ms / 1000.0 / self.speedup

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={}, step_duration_s=0.0)
        sampled = {seq.req_id: self._token_for(seq) for seq in scheduler_output.seqs if seq.sample}
        return ModelRunnerOutput(
            sampled_token_ids=sampled, step_duration_s=self.step_time_s(scheduler_output)
        )

    def _token_for(self, seq: ScheduledSeq) -> int:
        key = f"{self.seed}:{seq.req_id}:{seq.num_output_tokens}".encode()
        token = xxhash.xxh3_64_intdigest(key) % self.vocab_size
        while token in self.excluded:
            token = (token + 1) % self.vocab_size
        return token
