"""The mock engine's executor: the real scheduler's plan, with compute replaced by a timing model.

Default model (milliseconds, from DESIGN.md; fitted on an H100 serving a Llama-3-8B-class model):

* prefill_ms(N) = 4.21e-7 * N**2 + 0.0152 * N + 16.5, N = uncached tokens computed in the step
* decode_ms(u)  = -25.74 * u**2 + 54.01 * u + 5.74,    u = KV cache utilisation in [0, 1]

A step with both prefill chunks and decodes costs the sum of both parts. ``speedup`` divides the
result. A measured profile (JSON, see ``TimingProfile.from_json``; ``strata profile`` writes one)
replaces the formulas with piecewise-linear interpolation over measured points: prefill time
against the tokens computed in a step, and decode step time either against KV utilisation or,
from a ``decode_grid``, against the batch size and the decodes' mean context length (bilinear).

Tokens are pseudo-random but deterministic per (seed, request id, position), never an EOS id,
so a mock request always runs to ``max_tokens`` (or a stop token id) and reruns reproduce.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from serving.engine.scheduler_output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput


@dataclass(frozen=True, slots=True)
class DecodeGrid:
    """Measured decode step time over batch size x mean context length; no I/O.

    ``ms[i][j]`` is the step time with ``batch_sizes[i]`` decodes whose mean context is
    ``context_tokens[j]`` tokens. Lookups interpolate bilinearly and clamp at the edges.
    """

    batch_sizes: tuple[float, ...]
    context_tokens: tuple[float, ...]
    ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for name, axis in (
            ("batch_sizes", self.batch_sizes),
            ("context_tokens", self.context_tokens),
        ):
            if not axis or any(a >= b for a, b in itertools.pairwise(axis)):
                raise ValueError(f"decode_grid.{name} must be a non-empty increasing list")
        if len(self.ms) != len(self.batch_sizes) or any(
            len(row) != len(self.context_tokens) for row in self.ms
        ):
            raise ValueError(
                "decode_grid.ms must have one row per batch size, one column per context"
            )

    def step_ms(self, batch_size: float, context_tokens: float) -> float:
        i, fi = _bracket(self.batch_sizes, batch_size)
        j, fj = _bracket(self.context_tokens, context_tokens)
        row0, row1 = self.ms[i], self.ms[min(i + 1, len(self.ms) - 1)]
        j1 = min(j + 1, len(row0) - 1)
        low = row0[j] + (row0[j1] - row0[j]) * fj
        high = row1[j] + (row1[j1] - row1[j]) * fj
        return low + (high - low) * fi


def _bracket(axis: Sequence[float], x: float) -> tuple[int, float]:
    """Index ``i`` and fraction ``f`` with ``x ~ axis[i] + f * (axis[i+1] - axis[i])``, clamped."""
    if x <= axis[0]:
        return 0, 0.0
    if x >= axis[-1]:
        return len(axis) - 1, 0.0
    i = bisect.bisect_right(axis, x) - 1
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


@dataclass(frozen=True, slots=True)
class TimingProfile:
    """Step cost as a function of prefill tokens and KV utilisation (or batch and context)."""

    # Polynomial coefficients, highest power first (numpy.polyval order), in milliseconds.
    prefill_coeffs_ms: tuple[float, ...] = (4.21e-7, 0.0152, 16.5)
    decode_coeffs_ms: tuple[float, ...] = (-25.74, 54.01, 5.74)
    # Measured points; when set they replace the polynomials (linear interpolation).
    prefill_points: tuple[tuple[float, float], ...] = ()  # (tokens, ms)
    decode_points: tuple[tuple[float, float], ...] = ()  # (kv usage, ms)
    # Measured decode step time by batch size and context; replaces both decode models.
    decode_grid: DecodeGrid | None = None

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

    def decode_step_ms(self, batch_size: int, mean_context_tokens: float, kv_usage: float) -> float:
        """One decode step of ``batch_size`` sequences: the grid when measured, else by usage."""
        if self.decode_grid is not None:
            return self.decode_grid.step_ms(batch_size, mean_context_tokens)
        return self.decode_ms(kv_usage)

    @classmethod
    def from_json(cls, path: Path) -> TimingProfile:
        """Load ``{"prefill": [[tokens, ms], ...], "decode": [[kv_usage, ms], ...]}``.

        Either list may instead be ``{"coeffs_ms": [a, b, c]}`` (highest power first).
        Points must be sorted by their first value. An optional ``"decode_grid"``:
        ``{"batch_sizes": [...], "context_tokens": [...], "ms": [[...], ...]}`` (what
        ``strata profile`` measures) replaces the decode model. Other keys (the profile's
        metadata) are ignored. Raises ``ValueError`` naming the file.
        """
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"bad timing profile {path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: dict) -> TimingProfile:
        grid = data.get("decode_grid")
        return cls(
            **_part(data, "prefill", "prefill_coeffs_ms", "prefill_points"),
            **_part(data, "decode", "decode_coeffs_ms", "decode_points"),
            decode_grid=(
                DecodeGrid(
                    tuple(float(b) for b in grid["batch_sizes"]),
                    tuple(float(c) for c in grid["context_tokens"]),
                    tuple(tuple(float(v) for v in row) for row in grid["ms"]),
                )
                if grid is not None
                else None
            ),
        )


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
        num_decodes = 0
        decode_context_tokens = 0
        for seq in scheduler_output.seqs:
            # One token after existing context costs what a decode token does: a decode, the
            # last prompt token a disaggregated decode worker recomputes after its KV pull,
            # or a 1-token tail of a chunked prefill.
            if seq.num_tokens == 1 and (seq.num_output_tokens > 0 or seq.start_pos > 0):
                num_decodes += 1
                decode_context_tokens += seq.start_pos + 1
            else:
                prefill_tokens += seq.num_tokens
        ms = self.profile.prefill_ms(prefill_tokens)
        if num_decodes:
            ms += self.profile.decode_step_ms(
                num_decodes, decode_context_tokens / num_decodes, scheduler_output.kv_usage
            )
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
