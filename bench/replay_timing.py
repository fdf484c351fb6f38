"""The mock engine's timing model, fast: what ``OfflineReplay`` and the planner study step with."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from serving.engine.timing import TimingProfile


class ScalarTimingProfile(TimingProfile):
    """``TimingProfile`` with the polynomials evaluated by scalar Horner: the same floats as
    ``numpy.polyval`` (which is also Horner), without its per-call overhead, which is about a
    tenth of a replay's time. Measured points still go through ``numpy.interp``."""

    def prefill_ms(self, num_tokens: int) -> float:
        if num_tokens <= 0 or self.prefill_points:
            return super().prefill_ms(num_tokens)
        return horner(self.prefill_coeffs_ms, float(num_tokens))

    def decode_ms(self, kv_usage: float) -> float:
        if self.decode_points:
            return super().decode_ms(kv_usage)
        return horner(self.decode_coeffs_ms, min(max(kv_usage, 0.0), 1.0))

    @classmethod
    def of(cls, profile: TimingProfile | None) -> ScalarTimingProfile:
        profile = profile or TimingProfile()
        return cls(**{f.name: getattr(profile, f.name) for f in dataclasses.fields(profile)})


def horner(coeffs: Sequence[float], x: float) -> float:
    """The polynomial ``coeffs`` (highest power first, as ``numpy.polyval``) at ``x``."""
    y = 0.0
    for c in coeffs:
        y = y * x + c
    return y
