"""The KV tiers' Prometheus metrics (``strata_kv_tier_*``), on the worker's registry.

Labels: the worker's ``model_name`` and ``engine`` plus ``tier`` (G1 device, G2 host, G3 disk,
G4 S3). Bytes moved between tiers go to the worker's ``strata_kv_transfer_bytes_total`` with
``transport="tier"`` and ``direction="onboard"|"offload"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.kvcache.stack import TierStats

_LABELS = ("model_name", "engine")
ESTIMATE_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
REASONS = ("checksum", "foreign", "header")


class TierMetrics:
    """Owns the tier metric families; the engine thread feeds them (``record_*``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        labels: dict[str, str],
        tiers: Sequence[str],
        transfer_bytes: Counter | None = None,
    ) -> None:
        self.labels = labels
        self.tiers = ("G1", *tiers)
        self._transfer_bytes = transfer_bytes

        def family(kind: Any, name: str, doc: str, extra: tuple[str, ...] = ("tier",), **kw: Any):
            return kind(name, doc, (*_LABELS, *extra), registry=registry, **kw)

        self.used = family(Gauge, "strata_kv_tier_used_blocks", "KV blocks held per tier.")
        self.capacity = family(
            Gauge, "strata_kv_tier_capacity_blocks", "KV block capacity per tier (0: no limit)."
        )
        self.hits = family(
            Counter,
            "strata_kv_tier_hit_blocks",
            "Blocks a prefix lookup found in each tier below the device.",
        )
        self.lookups = family(
            Counter,
            "strata_kv_tier_lookup_blocks",
            "Blocks looked up past the device tier (denominator of tier hits).",
            extra=(),
        ).labels(**labels)
        self.onboarded = family(
            Counter, "strata_kv_tier_onboarded_blocks", "Blocks copied into the device per tier."
        )
        self.checksum_failures = family(
            Counter,
            "strata_kv_tier_checksum_failures",
            "Blocks whose bytes failed their checksum on onboard (dropped and recomputed).",
        )
        self.rejected = family(
            Counter,
            "strata_kv_tier_rejected_blocks",
            "Blocks refused on onboard: checksum, foreign (another model or version), header.",
            extra=("tier", "reason"),
        )
        self.stores = family(
            Counter,
            "strata_kv_tier_stores",
            "Block copies into a tier: ok, failed, skipped (no evictable room).",
            extra=("tier", "outcome"),
        )
        self.evicted = family(
            Counter, "strata_kv_tier_evicted_blocks", "Blocks evicted from a tier (LRU)."
        )
        self.decisions = family(
            Counter,
            "strata_kv_tier_onboard_decisions",
            "Cost-check decisions for prefixes found below the device: onboard or recompute.",
            extra=("decision",),
        )
        self.est_onboard = family(
            Histogram,
            "strata_kv_tier_estimated_onboard_seconds",
            "The cost check's estimate of moving a prefix's lower-tier blocks to the device.",
            extra=(),
            buckets=ESTIMATE_BUCKETS_S,
        ).labels(**labels)
        self.est_recompute = family(
            Histogram,
            "strata_kv_tier_estimated_recompute_seconds",
            "The cost check's estimate of recomputing the same blocks.",
            extra=(),
            buckets=ESTIMATE_BUCKETS_S,
        ).labels(**labels)
        self.listings = family(
            Counter,
            "strata_kv_tier_listings",
            "Listings of a shared tier's store applied (other workers' blocks become findable).",
        )
        self.transfer_seconds = family(
            Histogram,
            "strata_kv_tier_transfer_seconds",
            "One onboard (all its blocks) or one block's offload, per tier.",
            extra=("tier", "direction"),
            buckets=ESTIMATE_BUCKETS_S,
        )
        for tier in self.tiers:  # every series exists from the first scrape
            for fam in (self.hits, self.onboarded, self.checksum_failures, self.evicted):
                fam.labels(**labels, tier=tier)
            for reason in REASONS:
                self.rejected.labels(**labels, tier=tier, reason=reason)
            for outcome in ("ok", "failed", "skipped"):
                self.stores.labels(**labels, tier=tier, outcome=outcome)
        for decision in ("onboard", "recompute"):
            self.decisions.labels(**labels, decision=decision)

    def record_stats(self, stats: TierStats) -> None:
        labels = self.labels
        self.lookups.inc(stats.lookup_blocks)
        for tier, n in stats.hit_blocks.items():
            self.hits.labels(**labels, tier=tier).inc(n)
        for tier, n in stats.onboarded_blocks.items():
            self.onboarded.labels(**labels, tier=tier).inc(n)
        for decision, n in stats.decisions.items():
            self.decisions.labels(**labels, decision=decision).inc(n)
        for onboard_s, recompute_s in stats.estimates:
            self.est_onboard.observe(onboard_s)
            self.est_recompute.observe(recompute_s)
        for (tier, reason), n in stats.rejected.items():
            self.rejected.labels(**labels, tier=tier, reason=reason).inc(n)
            if reason == "checksum":
                self.checksum_failures.labels(**labels, tier=tier).inc(n)
        for outcome, counts in (
            ("ok", stats.stored_blocks),
            ("failed", stats.failed_stores),
            ("skipped", stats.skipped_stores),
        ):
            for tier, n in counts.items():
                self.stores.labels(**labels, tier=tier, outcome=outcome).inc(n)
        for tier, n in stats.evicted_blocks.items():
            self.evicted.labels(**labels, tier=tier).inc(n)

    def set_occupancy(self, tier: str, used: int, capacity: int | None) -> None:
        self.used.labels(**self.labels, tier=tier).set(used)
        self.capacity.labels(**self.labels, tier=tier).set(capacity or 0)

    def record_listing(self, tier: str) -> None:
        self.listings.labels(**self.labels, tier=tier).inc()

    def record_onboard(self, num_bytes_by_tier: dict[str, int], seconds: float) -> None:
        """One onboard: its time under the tier that moved most of its bytes."""
        if not num_bytes_by_tier:
            return
        main_tier = max(num_bytes_by_tier, key=num_bytes_by_tier.__getitem__)
        self.transfer_seconds.labels(**self.labels, tier=main_tier, direction="onboard").observe(
            seconds
        )
        if self._transfer_bytes is not None:
            for tier, num_bytes in num_bytes_by_tier.items():
                if num_bytes:
                    self._transfer_bytes.labels(
                        **self.labels, transport="tier", tier=tier, direction="onboard"
                    ).inc(num_bytes)

    def record_transfer(self, tier: str, direction: str, num_bytes: int, seconds: float) -> None:
        self.transfer_seconds.labels(**self.labels, tier=tier, direction=direction).observe(seconds)
        if self._transfer_bytes is not None and num_bytes:
            self._transfer_bytes.labels(
                **self.labels, transport="tier", tier=tier, direction=direction
            ).inc(num_bytes)
