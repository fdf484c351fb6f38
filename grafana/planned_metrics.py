"""Metrics the dashboards use that no component emits yet: the contract for their emitters.

name -> (type, labels, meaning). The components that will emit them own the names; the
integration test skips panels on them by name, and docs/observability.md lists them. Every
metric the dashboards use is emitted now (the KV tiers' ``strata_kv_tier_*`` were the last).
"""

from __future__ import annotations

PLANNED_METRICS: dict[str, tuple[str, str, str]] = {}
