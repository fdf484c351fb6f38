"""Lower KV tiers behind the engine, with every copy done by hand: scheduler + tier stack + core.

The fake runner of ``tests/engine/test_scheduler`` writes each token id into its KV slot and
samples from the whole context read back through the block table, so a block onboarded into
the wrong place, too early or with stale contents changes the output. "Tiers" here hold copies
of those slots by block hash; ``Executor`` runs the stack's jobs the way the manager does.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from serving.engine.core import EngineCore
from serving.engine.kv_offload import KVOnboard
from serving.engine.request import Request, RequestStatus, SamplingParams
from serving.engine.scheduler import SchedulerConfig
from serving.kvcache.policy import CostModel
from serving.kvcache.stack import DropJob, OnboardResult, StoreJob, TierIndex, TierStack
from serving.router.block_set import BlockSetTracker
from tests.engine.test_scheduler import FakeRunner, mix, reference

BLOCK = 4


class Runner(FakeRunner):
    kv_bytes_per_token = 8

    def __init__(self, num_blocks: int) -> None:
        super().__init__(BLOCK, mix)
        self.num_blocks = num_blocks


class Executor:
    """Does what ``KVTierManager`` does, synchronously, on slot dictionaries."""

    def __init__(self, core: EngineCore, runner: Runner) -> None:
        self.core, self.runner = core, runner
        self.stores: dict[str, dict[int, list[int | None]]] = {"G2": {}, "G3": {}, "G4": {}}
        self.jobs: list = []
        self.onboards: list[KVOnboard] = []
        self.fail_hashes: dict[int, str] = {}  # block hash -> rejection reason on onboard

    def read_block(self, block_id: int) -> list[int | None]:
        return [self.runner.slots.get((block_id, o)) for o in range(BLOCK)]

    def run_jobs(self) -> None:
        while self.jobs or (jobs := self.core.take_tier_jobs()):
            jobs, self.jobs = self.jobs or jobs, []
            for job in jobs:
                store = self.stores[job.tier]
                if isinstance(job, DropJob):
                    for h in job.block_hashes:
                        store.pop(h, None)
                    continue
                assert isinstance(job, StoreJob)
                for h in job.evict_hashes:
                    del store[h]
                if job.source_tier == "G1":
                    data = self.read_block(job.source_block_id)
                else:
                    data = list(self.stores[job.source_tier][job.block_hash])
                store[job.block_hash] = data
                self.core.finish_tier_job(job.job_id, succeeded=True)

    def run_onboards(self) -> None:
        onboards, self.onboards = self.onboards, []
        for onboard in onboards:
            loaded, rejected = 0, []
            for i, (h, tier, block_id) in enumerate(
                zip(onboard.block_hashes, onboard.tiers, onboard.local_block_ids, strict=True)
            ):
                if h in self.fail_hashes:
                    rejected.append((i, self.fail_hashes.pop(h)))
                    continue
                for o, value in enumerate(self.stores[tier][h]):
                    self.runner.slots[(block_id, o)] = value
                if not rejected:
                    loaded += 1
            self.core.finish_kv_onboard(
                onboard, OnboardResult(onboard.request_id, loaded, tuple(rejected))
            )

    def step(self):
        result = self.core.step()
        self.jobs.extend(result.tier_jobs)
        self.onboards.extend(result.kv_onboards)
        return result

    def run(self, requests: list[Request], max_steps: int = 2000) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        for r in requests:
            self.core.add_request(r)
        for _ in range(max_steps):
            if not self.core.num_unfinished_requests:
                self.run_jobs()
                return out
            result = self.step()
            for o in result.outputs:
                out[o.request_id].extend(o.new_token_ids)
                self.cached[o.request_id] = o.num_cached_tokens
            self.run_jobs()
            self.run_onboards()
        raise AssertionError("not finished")

    cached: dict[str, int] = {}


def make(
    num_blocks: int = 16,
    tiers: tuple[tuple[str, int | None], ...] = (("G2", 64),),
    min_uses: int = 2,
    prefill_tokens_per_s: float = 1.0,  # recompute looks slow: the cost check onboards
) -> tuple[EngineCore, Executor, TierStack]:
    runner = Runner(num_blocks)
    core = EngineCore(runner, SchedulerConfig(16, 256, num_blocks * BLOCK))
    cost = CostModel.make(BLOCK, BLOCK * 8, prefill_tokens_per_s=prefill_tokens_per_s)
    stack = TierStack(
        [TierIndex(n, c, shared=n == "G4") for n, c in tiers], cost, min_uses=min_uses
    )
    core.attach_tiers(stack)
    ex = Executor(core, runner)
    ex.cached = {}
    return core, ex, stack


def req(rid: str, prompt: list[int], max_tokens: int = 5) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0))


def expected(prompt: list[int], max_tokens: int = 5) -> list[int]:
    return reference(prompt, SamplingParams(max_tokens=max_tokens), mix)[0]


PROMPT = list(range(1, 24))  # 23 tokens: 5 full blocks usable as a hit


def test_evicted_prefix_onboards_from_the_host_tier_with_identical_output() -> None:
    core, ex, stack = make()
    assert ex.run([req("a", PROMPT)])["a"] == expected(PROMPT)
    assert set(ex.stores["G2"]) == stack.held_hashes("G2") and len(ex.stores["G2"]) >= 5
    assert core.reset_prefix_cache()  # G1 forgets; G2 keeps
    tokens = ex.run([req("b", PROMPT)])["b"]
    assert tokens == expected(PROMPT)
    assert ex.cached["b"] == 20  # 5 blocks of 4: (23 - 1) // 4
    stats = stack.take_stats()
    assert stats.onboarded_blocks["G2"] == 5 and stats.decisions["onboard"] == 1


def test_request_waits_for_its_onboard_and_blocks_are_not_findable_before() -> None:
    core, ex, _ = make()
    ex.run([req("a", PROMPT)])
    core.reset_prefix_cache()
    core.add_request(req("b", PROMPT))
    result = ex.step()
    assert not result.outputs and len(result.kv_onboards) == 1
    assert core.scheduler.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    # A second request with the same prompt finds nothing in G1 yet: it onboards on its own.
    core.add_request(req("c", PROMPT))
    ex.step()
    assert len(ex.onboards) == 2
    assert core.kv_cache_manager.block_pool.cached_block_hashes() == set()
    ex.run_onboards()
    ex.run([])
    assert ex.cached == {"a": 0, "b": 20, "c": 20}


def test_cost_check_recomputes_when_moving_is_slower() -> None:
    core, ex, stack = make(prefill_tokens_per_s=1e12)
    ex.run([req("a", PROMPT)])
    core.reset_prefix_cache()
    assert ex.run([req("b", PROMPT)])["b"] == expected(PROMPT)
    assert ex.cached["b"] == 0
    stats = stack.take_stats()
    assert stats.decisions["recompute"] == 1 and stats.onboarded_blocks.total() == 0
    onboard_s, recompute_s = stats.estimates[-1]
    assert onboard_s > recompute_s > 0


def test_corrupt_block_is_dropped_counted_and_recomputed() -> None:
    core, ex, stack = make()
    ex.run([req("a", PROMPT)])
    core.reset_prefix_cache()
    third = sorted(stack.held_hashes("G2"), key=list(ex.stores["G2"]).index)[2]
    ex.fail_hashes[third] = "checksum"
    assert ex.run([req("b", PROMPT)])["b"] == expected(PROMPT)
    assert ex.cached["b"] == 8  # the two blocks before the bad one
    stats = stack.take_stats()
    assert stats.rejected[("G2", "checksum")] == 1
    # The bad copy was dropped, and the recomputed block was written through again.
    assert third in ex.stores["G2"] and third in stack.held_hashes("G2")


def test_hot_blocks_are_copied_down_and_one_off_blocks_are_not() -> None:
    _, ex, stack = make(tiers=(("G2", 64), ("G3", 64)), min_uses=2)
    ex.run([req("a", PROMPT)])
    assert stack.held_hashes("G3") == set()  # used once: stays in G2
    ex.run([req("b", [*PROMPT[:13], 99, 98, 97])])  # shares 3 blocks (12 tokens)
    assert len(stack.held_hashes("G3")) == 3
    assert set(ex.stores["G3"]) == stack.held_hashes("G3")


def test_kv_events_rebuild_every_tier_after_random_evictions() -> None:
    """Acceptance 4 at the engine level: evictions in G1, G2, G3 and G4."""
    core, ex, stack = make(num_blocks=24, tiers=(("G2", 12), ("G3", 10), ("G4", 8)), min_uses=1)
    rng = random.Random(7)
    prefixes = [[rng.randrange(1, 500) for _ in range(rng.randrange(8, 40))] for _ in range(10)]
    tracker = BlockSetTracker()
    removed: dict[str, int] = {}
    for i in range(60):
        prompt = [*rng.choice(prefixes)[: rng.randrange(5, 40)], 1000 + i]
        if rng.random() < 0.2:
            assert core.reset_prefix_cache()
        ex.run([req(f"r{i}", prompt, max_tokens=rng.randrange(1, 6))])
        for event in core.take_kv_events():
            tracker.apply_event(event)
            if type(event).__name__ == "BlockRemoved":
                removed[event.medium] = removed.get(event.medium, 0) + 1
    assert set(removed) == {"GPU", "CPU", "DISK", "S3"}, removed
    pool = core.kv_cache_manager.block_pool
    assert tracker.held_hashes("GPU") == pool.cached_block_hashes()
    for tier, medium in (("G2", "CPU"), ("G3", "DISK"), ("G4", "S3")):
        assert tracker.held_hashes(medium) == stack.held_hashes(tier) == set(ex.stores[tier])


@pytest.mark.parametrize("reason", ["foreign", "missing"])
def test_foreign_or_missing_blocks_are_refused_without_dropping_other_models_bytes(
    reason: str,
) -> None:
    core, ex, stack = make(tiers=(("G4", None),))
    ex.run([req("a", PROMPT)])
    core.reset_prefix_cache()
    first = next(iter(ex.stores["G4"]))
    ex.fail_hashes[first] = reason
    assert ex.run([req("b", PROMPT)])["b"] == expected(PROMPT)
    assert ex.cached["b"] == 0
    stats = stack.take_stats()
    assert stats.rejected.get(("G4", "foreign"), 0) == (reason == "foreign")
    assert stats.rejected.get(("G4", "checksum"), 0) == 0
