"""A worker's KV tiers over HTTP with real stores (host memory, a directory, moto S3).

The mock engine keeps these fast: it schedules, caches and publishes KV events like the real
one, and its tiers move a small stand-in block per block (the SmolLM2 tests move real KV).
"""

from __future__ import annotations

import random
from pathlib import Path

import httpx

from serving.engine.config import EngineConfig
from serving.kvcache.config import KVTierConfig
from serving.router.block_set import BlockSetTracker
from serving.router.subscriber import KVEventSubscriber
from serving.worker.config import WorkerConfig
from serving.worker.server import build_state
from tests.worker.conftest import labelled, scrape, serve_in_thread, wait_until

BLOCK_MIB = 2  # the mock's modelled block: 16 tokens x 128 KiB (Llama-3-8B in bf16)


def gib(num_blocks: int) -> float:
    return num_blocks * BLOCK_MIB / 1024


def test_kv_events_rebuild_every_tier_of_a_worker(tmp_path: Path, kv_bucket: str) -> None:
    """Acceptance 4: after a random workload with evictions in G1-G4, the blocks rebuilt from
    the worker's KV events equal, per tier, what the tier holds (index and store)."""
    config = WorkerConfig(
        engine=EngineConfig(engine="mock", vocab_size=5000, num_blocks=24, speedup=1000.0),
        kv_events_port=0,
        served_model_name=["mock"],
        kv_tiers=KVTierConfig(
            host_gib=gib(12),
            disk_gib=gib(10),
            disk_dir=tmp_path / "kv",
            s3_uri=kv_bucket,
            s3_gib=gib(8),
            min_uses=1,
            s3_list_interval_s=0.2,
        ),
    )
    server = serve_in_thread(build_state(config))
    health = server.state.extra_health
    subscriber = KVEventSubscriber(
        f"tcp://127.0.0.1:{health['kv_events_port']}",
        replay_endpoint=f"tcp://127.0.0.1:{health['kv_events_replay_port']}",
    )
    tracker = BlockSetTracker()
    removed: dict[str, int] = {}
    engine = server.state.engine
    stack, stores = engine.core.tiers, engine.tiers.manager.stores
    rng = random.Random(3)
    prefixes = [[rng.randrange(10, 4000) for _ in range(rng.randrange(40, 160))] for _ in range(8)]
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for i in range(40):
                prompt = [*rng.choice(prefixes)[: rng.randrange(20, 160)], 4500 + i]
                body = {"model": "mock", "prompt": prompt, "max_tokens": rng.randrange(1, 8)}
                client.post("/completions", json=body).raise_for_status()

        def rebuilt() -> bool:
            for _, batch in subscriber.poll(timeout_ms=50) or subscriber.catch_up():
                tracker.apply(batch.events)
                for event in batch.events:
                    if type(event).__name__ == "BlockRemoved":
                        removed[event.medium] = removed.get(event.medium, 0) + 1
            if stack.num_jobs_in_flight:
                return False
            pool = engine.core.kv_cache_manager.block_pool
            return tracker.held_hashes("GPU") == pool.cached_block_hashes() and all(
                tracker.held_hashes(medium) == stack.held_hashes(tier)
                for tier, medium in (("G2", "CPU"), ("G3", "DISK"), ("G4", "S3"))
            )

        wait_until(rebuilt, "the KV events to match every tier", timeout_s=60)
        assert set(removed) == {"GPU", "CPU", "DISK", "S3"}, removed
        for tier, medium in (("G2", "CPU"), ("G3", "DISK"), ("G4", "S3")):
            assert set(stores[tier].list_hashes()) == tracker.held_hashes(medium) != set()
        values = scrape(server.url)
        for tier in ("G2", "G3", "G4"):
            assert labelled(values, "strata_kv_tier_evicted_blocks_total", tier=tier) > 0
            assert labelled(values, "strata_kv_tier_used_blocks", tier=tier) > 0
        assert subscriber.num_lost_batches == 0
    finally:
        subscriber.close()
        server.stop()
