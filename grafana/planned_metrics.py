"""Metrics the dashboards use that no component emits yet: the contract for their emitters.

name -> (type, labels, meaning). The components that will emit them own the names; the
integration test skips panels on them by name, and docs/observability.md lists them.
"""

from __future__ import annotations

PLANNED_METRICS: dict[str, tuple[str, str, str]] = {
    "strata_kv_tier_used_blocks": ("gauge", "model, tier", "KV blocks held per tier (G1-G4)."),
    "strata_kv_tier_capacity_blocks": ("gauge", "model, tier", "KV block capacity per tier."),
    "strata_kv_tier_hit_blocks_total": (
        "counter",
        "model, tier",
        "Blocks a prefix lookup found in each tier below the device.",
    ),
    "strata_kv_tier_lookup_blocks_total": (
        "counter",
        "model",
        "Blocks looked up past the device tier (denominator of tier hits).",
    ),
}
