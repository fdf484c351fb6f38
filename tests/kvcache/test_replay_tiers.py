"""The offline replay with KV tiers (``bench/replay_tiers.py``): G2 per worker, a shared G4."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.replay import ReplayConfig, run_offline
from bench.trace import TraceRequest, make_synthetic_trace


@pytest.fixture(scope="module")
def trace() -> list[TraceRequest]:
    """120 requests over 8 shared 6-block prefixes: more prefix blocks than a G1 of 16 holds."""
    return make_synthetic_trace(120, block_size=16, rate_per_s=2.0, seed=1)


def replay(trace: list[TraceRequest], router: str = "kv", **tiers: object) -> dict:
    settings: dict[str, object] = {
        "trace": Path("synthetic.jsonl"),
        "workers": 4,
        "routers": (router,),
        "kv_blocks_per_worker": 16,
        "block_size": 16,
        "max_num_batched_tokens": 256,
        "kv_bytes_per_token": 1024,  # 16 KiB blocks: every tier here beats recomputing
        "kv_s3_latency_s": 0.0,
    }
    config = ReplayConfig(**(settings | tiers))
    return run_offline(config, requests=trace)["policies"][router]


def test_a_host_tier_raises_the_hit_rate_and_tokens_come_back_from_it(
    trace: list[TraceRequest],
) -> None:
    g1 = replay(trace)
    g2 = replay(trace, kv_host_blocks_per_worker=64)
    assert g1.get("kv_tiers") is None
    assert g2["requests"]["completed"] == g1["requests"]["completed"] == 120
    onboarded = g2["kv_tiers"]["onboarded_tokens"]["G2"]
    assert onboarded > 0
    assert g2["hit_rate"] > g1["hit_rate"]
    assert g2["cached_tokens"] - g1["cached_tokens"] <= onboarded
    assert g2["kv_tiers"]["cost_check"].get("recompute", 0) == 0


def test_a_shared_s3_tier_serves_blocks_another_worker_wrote(trace: list[TraceRequest]) -> None:
    """Round-robin sends a prefix to every worker: with one G4 shared by all, workers that
    never computed a prefix onboard it."""
    alone = replay(trace, "round-robin")
    shared = replay(trace, "round-robin", kv_s3_blocks=10_000, kv_offload_min_uses=1)
    tiers = shared["kv_tiers"]
    assert tiers["onboarded_tokens"]["G4"] > 0
    assert shared["hit_rate"] > alone["hit_rate"]


def test_the_cost_check_recomputes_when_s3_is_slower(trace: list[TraceRequest]) -> None:
    slow = replay(
        trace,
        "round-robin",
        kv_s3_blocks=10_000,
        kv_offload_min_uses=1,
        kv_bytes_per_token=131_072,
        kv_s3_bandwidth_gbps=0.1,
    )
    tiers = slow["kv_tiers"]
    assert tiers["hit_blocks"]["G4"] > 0
    assert tiers["onboarded_tokens"] == {}
    assert tiers["cost_check"]["recompute"] > 0 and "onboard" not in tiers["cost_check"]
