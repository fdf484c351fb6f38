"""The KV cache tiers row of the Workers dashboard: occupancy, hits, the onboard-or-recompute
cost check, copies and evictions. The tier metrics are the worker's (label ``model_name``)."""

from __future__ import annotations

from grafana.panels import Panel, Query, Row, thirds
from grafana.promql import MODEL_NAME, rate

TIER = MODEL_NAME


def kv_tier_panels() -> tuple[Panel | Row, ...]:
    return (
        Row("KV cache tiers"),
        *thirds(*_tier_state_panels(), *_onboard_panels(), *_copy_panels()),
    )


def _tier_state_panels() -> tuple[Panel, ...]:
    return (
        Panel(
            "KV tier occupancy",
            (
                Query(
                    f"sum by (tier) (strata_kv_tier_used_blocks{{{TIER}}}) / (sum by (tier) "
                    f"(strata_kv_tier_capacity_blocks{{{TIER}}}) > 0)",
                    "{{tier}}",
                ),
            ),
            unit="percentunit",
            description="G1 device, G2 host, G3 disk, G4 S3 (a G4 without a limit has no "
            "occupancy: see blocks per tier).",
        ),
        Panel(
            "KV blocks per tier",
            (Query(f"sum by (tier) (strata_kv_tier_used_blocks{{{TIER}}})", "{{tier}}"),),
            description="G4 counts the blocks this worker's listing of the shared store saw.",
        ),
        Panel(
            "KV tier hit rate",
            (
                Query(
                    f"sum by (tier) ({rate('strata_kv_tier_hit_blocks_total', TIER)}) / "
                    f"ignoring (tier) group_left "
                    f"sum({rate('strata_kv_tier_lookup_blocks_total', TIER)})",
                    "{{tier}}",
                ),
            ),
            unit="percentunit",
            description="Blocks found in each tier / blocks looked up past the device.",
        ),
    )


def _onboard_panels() -> tuple[Panel, ...]:
    """Prefixes found below the device: moved up or recomputed, and blocks refused on the way."""
    return (
        Panel(
            "Cost check: onboard or recompute",
            (
                Query(
                    f"sum by (decision) ({rate('strata_kv_tier_onboard_decisions_total', TIER)})",
                    "{{decision}}",
                ),
            ),
            unit="ops",
            description="Requests whose prefix continued below the device: moved up "
            "(onboard) or recomputed because moving it was estimated slower.",
        ),
        Panel(
            "Cost check estimates (p50)",
            tuple(
                Query(
                    f"histogram_quantile(0.5, sum by (le) "
                    f"({rate(f'strata_kv_tier_estimated_{what}_seconds_bucket', TIER)}))",
                    what,
                )
                for what in ("onboard", "recompute")
            ),
            unit="s",
            description="Per decision: estimated time to move the prefix's lower-tier blocks "
            "(bytes / measured bandwidth + latency) and to recompute them (measured prefill).",
        ),
        Panel(
            "Blocks refused on onboard",
            (
                Query(
                    f"sum by (tier, reason) ({rate('strata_kv_tier_rejected_blocks_total', TIER)})",
                    "{{tier}} {{reason}}",
                ),
            ),
            unit="ops",
            description="Dropped and recomputed, never served: checksum (bytes damaged), "
            "foreign (another model or version), header (unreadable or another block).",
        ),
    )


def _copy_panels() -> tuple[Panel, ...]:
    tier_transport = f'{MODEL_NAME}, transport="tier"'
    return (
        Panel(
            "KV tier copy time",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (tier, direction, le) "
                    f"({rate('strata_kv_tier_transfer_seconds_bucket', TIER)}))",
                    f"p{round(q * 100)} {{{{direction}}}} {{{{tier}}}}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
            description="onboard: one request's blocks into the device (under the tier that "
            "moved most of them); offload: one block's copy into a tier.",
        ),
        Panel(
            "KV tier stores and evictions",
            (
                Query(
                    f"sum by (tier, outcome) ({rate('strata_kv_tier_stores_total', TIER)})",
                    "store {{outcome}} {{tier}}",
                ),
                Query(
                    f"sum by (tier) ({rate('strata_kv_tier_evicted_blocks_total', TIER)})",
                    "evicted {{tier}}",
                ),
            ),
            unit="ops",
            description="Copies into each tier (ok, failed, skipped: no evictable room) and "
            "least-recently-used evictions.",
        ),
        Panel(
            "KV tier bytes per second",
            (
                Query(
                    f"sum by (tier, direction) "
                    f"({rate('strata_kv_transfer_bytes_total', tier_transport)})",
                    "{{direction}} {{tier}}",
                ),
            ),
            unit="Bps",
            description="Offload (device to a tier, or down a tier) and onboard (into the "
            "device) bytes.",
        ),
    )
