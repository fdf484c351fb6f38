"""Offload and onboard policy: the cost check and the frequency filter. Pure; no I/O, no clocks.

**Cost check.** A request's prefix continues below G1 in a run of blocks, each in the fastest
tier holding it. Onboarding its first ``c`` blocks costs, per tier ``t`` with ``n_t`` of them,

    onboard_s(c) = sum_t  latency_t * ceil(n_t / concurrency_t) + n_t * block_bytes / bandwidth_t

and saves ``recompute_s(c) = c * block_size * prefill_s_per_token``. The check takes the ``c``
(at a tier boundary or the whole run) with the largest saving, and recomputes when no ``c``
saves anything. Bandwidths and the prefill speed start from defaults and follow what the
worker measures, so the choice adapts to the machine: bandwidths as exponential moving averages,
the prefill speed as the slope of step time against prompt tokens (a least-squares line with
exponential forgetting, ``PrefillFit``): a step's fixed cost (reading the weights once) is not
charged per token, so a 32-token step does not make a 16,000-token recompute look 25x dearer.

**Frequency filter.** A block is written through to the first tier below G1; deeper tiers take
a copy only once the block has been used by ``min_uses`` requests, so one-off blocks do not
wear the disk or fill S3.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Defaults until measured. G2/G3 from this project's measurements (docs/transfer.md, DESIGN:
# pinned host->device 55 GB/s on an H100, local NVMe 1.6 GB/s); G4 a conservative S3 GET.
DEFAULT_TIER_BANDWIDTH_BYTES_PER_S: dict[str, float] = {"G2": 10e9, "G3": 1.5e9, "G4": 0.2e9}
CUDA_HOST_BANDWIDTH_BYTES_PER_S = 25e9
DEFAULT_TIER_LATENCY_S: dict[str, float] = {"G2": 20e-6, "G3": 200e-6, "G4": 0.02}
DEFAULT_TIER_CONCURRENCY: dict[str, int] = {"G2": 1, "G3": 1, "G4": 8}
# Until the worker has measured its own prefill: a small model on CPU, a big one on a GPU.
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0
CUDA_PREFILL_TOKENS_PER_S = 20000.0
_EMA_WEIGHT = 0.3
_FIT_DECAY = 0.8  # per observed step: the fit remembers about the last ten prefill steps
_MIN_RELATIVE_SPREAD = 0.25  # token counts closer than this: use their ratio, not a slope
_MIN_MEASURED_BYTES = 1 << 16  # smaller transfers measure latency, not bandwidth
_MIN_MEASURED_TOKENS = 32


@dataclass(slots=True)
class TierSpeed:
    bandwidth_bytes_per_s: float
    latency_s: float
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class OnboardDecision:
    """How many of the run's blocks to onboard (0: recompute) and both estimates (seconds)."""

    num_blocks: int
    est_onboard_s: float
    est_recompute_s: float

    @property
    def onboard(self) -> bool:
        return self.num_blocks > 0


@dataclass(slots=True)
class PrefillFit:
    """``seconds = fixed_s + s_per_token * tokens`` over observed prefill steps, by least
    squares with exponential forgetting. Pure arithmetic on decayed sums."""

    n: float = 0.0
    sum_tokens: float = 0.0
    sum_s: float = 0.0
    sum_tokens_sq: float = 0.0
    sum_tokens_s: float = 0.0

    def add(self, num_tokens: int, seconds: float) -> None:
        d = _FIT_DECAY
        self.n = d * self.n + 1.0
        self.sum_tokens = d * self.sum_tokens + num_tokens
        self.sum_s = d * self.sum_s + seconds
        self.sum_tokens_sq = d * self.sum_tokens_sq + num_tokens * num_tokens
        self.sum_tokens_s = d * self.sum_tokens_s + num_tokens * seconds

    def s_per_token(self) -> float:
        """The marginal seconds per prompt token: the slope where the steps' sizes differ
        enough to fit one, else the token-weighted mean (the fixed cost then included)."""
        ratio = self.sum_s / self.sum_tokens
        mean = self.sum_tokens / self.n
        var = self.sum_tokens_sq / self.n - mean * mean
        if self.n < 1.5 or var <= (_MIN_RELATIVE_SPREAD * mean) ** 2:  # one step: no slope
            return ratio
        slope = (self.sum_tokens_s / self.n - mean * self.sum_s / self.n) / var
        return slope if 0 < slope <= ratio else ratio


@dataclass
class CostModel:
    """Owns the estimated tier speeds and prefill speed; updated by measurements."""

    block_size: int
    block_bytes: int
    speeds: dict[str, TierSpeed] = field(default_factory=dict)
    prefill_s_per_token: float = 1.0 / DEFAULT_PREFILL_TOKENS_PER_S
    # False: onboard every block found, whatever the estimates say (they are still reported).
    check: bool = True
    prefill_fit: PrefillFit = field(default_factory=PrefillFit)

    @classmethod
    def make(
        cls,
        block_size: int,
        block_bytes: int,
        *,
        bandwidths: Mapping[str, float] | None = None,
        latencies: Mapping[str, float] | None = None,
        prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
    ) -> CostModel:
        bw = {**DEFAULT_TIER_BANDWIDTH_BYTES_PER_S, **(bandwidths or {})}
        lat = {**DEFAULT_TIER_LATENCY_S, **(latencies or {})}
        speeds = {t: TierSpeed(bw[t], lat[t], DEFAULT_TIER_CONCURRENCY[t]) for t in bw}
        return cls(block_size, block_bytes, speeds, 1.0 / prefill_tokens_per_s)

    def onboard_s(self, num_blocks_by_tier: Mapping[str, int]) -> float:
        total = 0.0
        for tier, n in num_blocks_by_tier.items():
            if n:
                speed = self.speeds[tier]
                rounds = -(-n // max(speed.concurrency, 1))
                total += (
                    speed.latency_s * rounds + n * self.block_bytes / speed.bandwidth_bytes_per_s
                )
        return total

    def recompute_s(self, num_blocks: int) -> float:
        return num_blocks * self.block_size * self.prefill_s_per_token

    def decide(self, run_tiers: Sequence[str]) -> OnboardDecision:
        """The cost check over a run of lower-tier blocks (``run_tiers[i]``: block i's tier)."""
        if not run_tiers:
            return OnboardDecision(0, 0.0, 0.0)
        counts: dict[str, int] = {}
        best = OnboardDecision(0, self.onboard_s({t: 1 for t in run_tiers[:1]}), 0.0)
        best_saving = 0.0
        for i, tier in enumerate(run_tiers):
            counts[tier] = counts.get(tier, 0) + 1
            at_boundary = i + 1 == len(run_tiers) or run_tiers[i + 1] != tier
            if not at_boundary:
                continue
            onboard_s, recompute_s = self.onboard_s(counts), self.recompute_s(i + 1)
            if recompute_s - onboard_s > best_saving:
                best_saving = recompute_s - onboard_s
                best = OnboardDecision(i + 1, onboard_s, recompute_s)
        if not self.check:
            n = len(run_tiers)
            return OnboardDecision(n, self.onboard_s(counts), self.recompute_s(n))
        if not best.onboard:
            all_onboard_s = self.onboard_s(counts)
            return OnboardDecision(0, all_onboard_s, self.recompute_s(len(run_tiers)))
        return best

    def observe_transfer(self, tier: str, num_bytes: int, seconds: float) -> None:
        """A measured read of ``num_bytes`` from ``tier``: follow its bandwidth."""
        if num_bytes < _MIN_MEASURED_BYTES or seconds <= 0 or tier not in self.speeds:
            return
        speed = self.speeds[tier]
        measured = num_bytes / seconds
        speed.bandwidth_bytes_per_s += _EMA_WEIGHT * (measured - speed.bandwidth_bytes_per_s)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """A measured step that computed ``num_tokens`` prompt tokens in ``seconds``."""
        if num_tokens < _MIN_MEASURED_TOKENS or seconds <= 0:
            return
        self.prefill_fit.add(num_tokens, seconds)
        self.prefill_s_per_token = self.prefill_fit.s_per_token()


class UseCounter:
    """Owns how many requests used each block hash (bounded, oldest forgotten first)."""

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self._counts: OrderedDict[int, int] = OrderedDict()

    def add(self, block_hashes: Iterable[int]) -> None:
        counts = self._counts
        for block_hash in block_hashes:
            counts[block_hash] = counts.get(block_hash, 0) + 1
            counts.move_to_end(block_hash)
        while len(counts) > self.max_entries:
            counts.popitem(last=False)

    def get(self, block_hash: int) -> int:
        return self._counts.get(block_hash, 0)
