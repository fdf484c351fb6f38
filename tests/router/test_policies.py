"""Routing policies and the router's WorkerLoad, with exact costs and seeded randomness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from serving.protocol.kv_events import BlockStored
from serving.router.indexer import KVIndexer
from serving.router.policies import (
    DEFAULT_PREFILL_SCALE,
    POLICY_NAMES,
    ApproxPolicy,
    KVCostConfig,
    KVPolicy,
    LeastLoadedPolicy,
    NoWorkersError,
    RandomPolicy,
    RequestView,
    RoundRobinPolicy,
    SessionPolicy,
    WorkerLoad,
    credit_blocks,
    kv_cost,
    make_policy,
    route_request,
    softmax_sample,
)

BS = 4
PROMPT = list(range(200, 216))  # 4 blocks
WORKERS = ["A", "B"]


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def store(indexer: KVIndexer, worker_id: str, num_blocks: int, medium: str = "GPU") -> None:
    event = BlockStored(
        block_hashes=list(range(1, num_blocks + 1)),
        parent_block_hash=None,
        token_ids=PROMPT[: num_blocks * BS],
        block_size=BS,
        medium=medium,
    )
    indexer.apply_event(worker_id, event)


def request(
    indexer: KVIndexer | None = None,
    token_ids: list[int] = PROMPT,
    request_id: str = "r",
    session_id: str | None = None,
) -> RequestView:
    hashes = (indexer or KVIndexer(BS)).hash_request(token_ids)
    return RequestView(request_id, len(token_ids), hashes, session_id)


def add_blocks(load: WorkerLoad, worker_id: str, num_blocks: int) -> None:
    """Give ``worker_id`` ``num_blocks`` active decode blocks (one request, prefill done)."""
    request_id = f"{worker_id}-{num_blocks}-{load.num_active_requests(worker_id)}"
    load.add_request(request_id, worker_id, num_prompt_tokens=num_blocks * BS)
    load.mark_prefill_done(request_id)


def kv_setup(
    a_blocks: int = 3, b_blocks: int = 1, **config: float
) -> tuple[KVIndexer, WorkerLoad, KVPolicy]:
    indexer = KVIndexer(BS)
    store(indexer, "A", a_blocks)
    store(indexer, "B", b_blocks)
    load = WorkerLoad(BS)
    return (
        indexer,
        load,
        KVPolicy(indexer, load, KVCostConfig(BS, **{"prefill_scale": 1.0, **config})),
    )


# Cost


def test_kv_cost_formula() -> None:
    config = KVCostConfig(BS, prefill_scale=2.0)
    assert credit_blocks({"GPU": 2, "CPU": 4, "DISK": 4, "S3": 10}, config.tier_weights) == 7.0
    assert credit_blocks({"NVME-X": 5}, config.tier_weights) == 0.0
    assert kv_cost(8, {"GPU": 3}, 5, config) == 2.0 * 5 + 5
    assert kv_cost(2, {"GPU": 3}, 5, config) == 5  # credits never go below zero prefill


# KV policy


def test_kv_prefers_longer_prefix() -> None:
    indexer, _, policy = kv_setup(a_blocks=3, b_blocks=1)
    decision = policy.choose(request(indexer), WORKERS)
    assert decision.worker_id == "A"
    assert decision.worker_costs == {"A": 1.0, "B": 3.0}
    assert (decision.policy, decision.reason, decision.num_cached_blocks) == ("kv", "min-cost", 3)


def test_kv_decode_load_outweighs_prefix() -> None:
    indexer, load, policy = kv_setup(a_blocks=3, b_blocks=1)
    add_blocks(load, "A", 3)  # A: 1 + 3 = 4 > B: 3 + 0
    decision = policy.choose(request(indexer), WORKERS)
    assert decision.worker_costs == {"A": 4.0, "B": 3.0}
    assert decision.worker_id == "B"


def test_kv_tie_goes_to_less_loaded() -> None:
    indexer, load, policy = kv_setup(a_blocks=3, b_blocks=1)
    add_blocks(load, "A", 2)  # A: 1 + 2 = 3 == B: 3 + 0
    decision = policy.choose(request(indexer), WORKERS)
    assert decision.worker_costs == {"A": 3.0, "B": 3.0}
    assert decision.worker_id == "B"


def test_kv_tie_goes_to_fewer_prefill_tokens_then_first_listed() -> None:
    indexer, load, policy = kv_setup(a_blocks=0, b_blocks=0)
    assert policy.choose(request(indexer), ["B", "A"]).worker_id == "B"
    load.add_request("a1", "A", num_prompt_tokens=8)
    load.mark_prefill_done("a1")
    load.add_request("b1", "B", num_prompt_tokens=8, num_cached_tokens=4)
    assert (load.load_key("A"), load.load_key("B")) == ((2, 0), (2, 4))
    decision = policy.choose(request(indexer), ["B", "A"])
    assert decision.worker_costs == {"B": 6.0, "A": 6.0}
    assert decision.worker_id == "A"


def test_tier_weights_change_the_cost() -> None:
    indexer = KVIndexer(BS)
    store(indexer, "A", 4, medium="CPU")  # credits 4 * 0.75 = 3
    store(indexer, "B", 2, medium="GPU")  # credits 2
    load = WorkerLoad(BS)
    decision = KVPolicy(indexer, load, KVCostConfig(BS, prefill_scale=1.0)).choose(
        request(indexer), WORKERS
    )
    assert decision.worker_costs == {"A": 1.0, "B": 2.0}
    assert decision.worker_id == "A"
    cheap_cpu = KVCostConfig(BS, prefill_scale=1.0, tier_weights={"GPU": 1.0, "CPU": 0.25})
    decision = KVPolicy(indexer, load, cheap_cpu).choose(request(indexer), WORKERS)
    assert decision.worker_costs == {"A": 3.0, "B": 2.0}
    assert decision.worker_id == "B"


def test_prefill_scale_weighs_uncached_blocks_against_decode_load() -> None:
    indexer, load, _ = kv_setup(a_blocks=3, b_blocks=1)
    add_blocks(load, "A", 3)
    policy = KVPolicy(indexer, load, KVCostConfig(BS, prefill_scale=4.0))
    decision = policy.choose(request(indexer), WORKERS)
    assert decision.worker_costs == {"A": 4.0 + 3, "B": 12.0}
    assert decision.worker_id == "A"


def test_partial_last_block_counts_as_prefill() -> None:
    indexer, _, policy = kv_setup(a_blocks=4, b_blocks=0)
    decision = policy.choose(request(indexer, [*PROMPT, 1, 2]), WORKERS)
    assert decision.worker_costs == {"A": 1.0, "B": 5.0}


def test_temperature_zero_is_argmin() -> None:
    indexer, _, _ = kv_setup(a_blocks=3, b_blocks=1)
    load = WorkerLoad(BS)
    policy = KVPolicy(indexer, load, KVCostConfig(BS, prefill_scale=1.0, temperature=0.0), seed=7)
    assert {policy.choose(request(indexer), WORKERS).worker_id for _ in range(50)} == {"A"}


def test_seeded_sampling_is_reproducible_and_favours_low_cost() -> None:
    indexer, load, _ = kv_setup(a_blocks=3, b_blocks=1)
    workers = ["A", "B", "C"]  # costs 1, 3, 4

    def run(seed: int) -> list[str]:
        policy = KVPolicy(
            indexer, load, KVCostConfig(BS, prefill_scale=1.0, temperature=0.5), seed=seed
        )
        return [policy.choose(request(indexer), workers).worker_id for _ in range(300)]

    first = run(seed=3)
    assert first == run(seed=3)
    assert first != run(seed=4)
    counts = Counter(first)
    assert counts["A"] > counts["B"] > counts["C"] > 0
    assert (
        KVPolicy(indexer, load, KVCostConfig(BS, prefill_scale=1.0, temperature=0.5))
        .choose(request(indexer), workers)
        .reason
        == "sampled"
    )


def test_softmax_sample_probabilities() -> None:
    rng = random.Random(0)
    draws = Counter(softmax_sample([0.0, 1.0], 1.0, rng) for _ in range(20_000))
    # p(0) = 1 / (1 + e^-1) = 0.731
    assert abs(draws[0] / 20_000 - 0.731) < 0.015
    equal = Counter(softmax_sample([5.0, 5.0, 5.0], 0.1, rng) for _ in range(3_000))
    assert set(equal) == {0, 1, 2}


def test_kv_only_scores_listed_workers() -> None:
    indexer, _, policy = kv_setup(a_blocks=4, b_blocks=1)
    decision = policy.choose(request(indexer), ["B", "C"])
    assert decision.worker_costs == {"B": 3.0, "C": 4.0}
    assert decision.worker_id == "B"


# Worker load


def test_worker_load_lifecycle() -> None:
    load = WorkerLoad(BS)
    load.add_request("r1", "A", num_prompt_tokens=10, num_cached_tokens=4)
    assert (load.active_prefill_tokens("A"), load.active_decode_blocks("A")) == (6, 3)
    load.add_request("r2", "A", num_prompt_tokens=8)
    assert (load.active_prefill_tokens("A"), load.active_decode_blocks("A")) == (14, 5)
    assert load.num_active_requests("A") == 2
    load.mark_prefill_done("r1")
    load.mark_prefill_done("r1")
    assert load.active_prefill_tokens("A") == 8
    load.add_output_tokens("r1", 2)  # 12 tokens: still 3 blocks
    assert load.active_decode_blocks("A") == 5
    load.add_output_tokens("r1", 1)  # 13 tokens: 4 blocks
    assert load.active_decode_blocks("A") == 6
    load.finish_request("r2")  # finished before its first token
    assert (load.active_prefill_tokens("A"), load.active_decode_blocks("A")) == (0, 4)
    load.finish_request("r1")
    assert load.load_key("A") == (0, 0)
    assert load.num_active_requests("A") == 0


def test_worker_load_remove_worker_and_unknown_ids() -> None:
    load = WorkerLoad(BS)
    load.add_request("r1", "A", num_prompt_tokens=8)
    load.add_request("r2", "B", num_prompt_tokens=4)
    with pytest.raises(ValueError, match="already active"):
        load.add_request("r1", "B", num_prompt_tokens=4)
    load.remove_worker("A")
    assert load.load_key("A") == (0, 0)
    load.mark_prefill_done("r1")
    load.add_output_tokens("r1", 5)
    load.finish_request("r1")
    load.finish_request("never-seen")
    assert load.load_key("B") == (1, 4)


def test_route_request_counts_the_decision_in_the_load() -> None:
    indexer, load, policy = kv_setup(a_blocks=3, b_blocks=1)
    decision = route_request(policy, load, request(indexer, request_id="r1"), WORKERS)
    assert decision.worker_id == "A"
    assert load.active_prefill_tokens("A") == 16 - 3 * BS
    assert load.active_decode_blocks("A") == 4
    second = policy.choose(request(indexer, request_id="r2"), WORKERS)
    assert second.worker_costs == {"A": 1.0 + 4, "B": 3.0}
    assert second.worker_id == "B"


# Load-only policies


def test_round_robin_cycles() -> None:
    policy = RoundRobinPolicy()
    picks = [policy.choose(request(), ["A", "B", "C"]).worker_id for _ in range(5)]
    assert picks == ["A", "B", "C", "A", "B"]
    assert policy.choose(request(), ["A", "B", "C"]).reason == "round-robin"


def test_random_is_seeded() -> None:
    def run(seed: int) -> list[str]:
        policy = RandomPolicy(seed)
        return [policy.choose(request(), ["A", "B", "C"]).worker_id for _ in range(30)]

    assert run(1) == run(1)
    assert set(run(1)) == {"A", "B", "C"}


def test_least_loaded() -> None:
    load = WorkerLoad(BS)
    add_blocks(load, "A", 2)
    add_blocks(load, "B", 1)
    policy = LeastLoadedPolicy(load)
    assert policy.choose(request(), ["A", "B", "C"]).worker_id == "C"
    assert policy.choose(request(), ["A", "B"]).worker_id == "B"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_workers_raises(name: str) -> None:
    load = WorkerLoad(BS)
    indexer = KVIndexer(BS)
    policy = make_policy(
        name, load, KVCostConfig(BS, prefill_scale=1.0), indexer, clock=FakeClock()
    )  # type: ignore[arg-type]
    assert policy.name == name
    with pytest.raises(NoWorkersError):
        policy.choose(request(session_id="s"), [])


def test_make_policy_needs_its_dependencies() -> None:
    load = WorkerLoad(BS)
    with pytest.raises(ValueError, match="KVIndexer"):
        make_policy("kv", load, KVCostConfig(BS, prefill_scale=1.0))
    with pytest.raises(ValueError, match="clock"):
        make_policy("approx", load, KVCostConfig(BS, prefill_scale=1.0))
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest", load, KVCostConfig(BS, prefill_scale=1.0))  # type: ignore[arg-type]


# Session affinity


def test_session_sticks_to_its_worker() -> None:
    load = WorkerLoad(BS)
    policy = SessionPolicy(load)
    first = policy.choose(request(session_id="s1"), WORKERS)
    assert (first.worker_id, first.reason) == ("A", "new-session")
    add_blocks(load, "A", 10)
    again = policy.choose(request(session_id="s1"), WORKERS)
    assert (again.worker_id, again.reason) == ("A", "sticky")
    other = policy.choose(request(session_id="s2"), WORKERS)
    assert (other.worker_id, other.reason) == ("B", "new-session")
    anonymous = policy.choose(request(), WORKERS)
    assert (anonymous.worker_id, anonymous.reason) == ("B", "no-session")


def test_session_rebinds_when_its_worker_is_gone() -> None:
    load = WorkerLoad(BS)
    policy = SessionPolicy(load)
    assert policy.choose(request(session_id="s1"), ["A", "B"]).worker_id == "A"
    add_blocks(load, "C", 1)
    moved = policy.choose(request(session_id="s1"), ["B", "C"])
    assert (moved.worker_id, moved.reason) == ("B", "sticky-worker-gone")
    back = policy.choose(request(session_id="s1"), ["A", "B", "C"])
    assert (back.worker_id, back.reason) == ("B", "sticky")


def test_session_map_is_bounded_lru() -> None:
    load = WorkerLoad(BS)
    policy = SessionPolicy(load, max_sessions=2)
    policy.choose(request(session_id="s1"), ["A"])
    policy.choose(request(session_id="s2"), ["A"])
    policy.choose(request(session_id="s1"), ["A"])  # s1 is now the most recent
    policy.choose(request(session_id="s3"), ["A"])  # evicts s2
    assert policy.choose(request(session_id="s1"), ["A"]).reason == "sticky"
    assert policy.choose(request(session_id="s2"), ["A"]).reason == "new-session"


# Approximate prefix


def test_approx_learns_from_its_decisions_and_forgets_after_ttl() -> None:
    clock = FakeClock()
    load = WorkerLoad(BS)
    policy = ApproxPolicy(load, KVCostConfig(BS, prefill_scale=1.0), ttl_s=60.0, clock=clock)
    add_blocks(load, "A", 1)  # so the first, cold decision goes to B
    cold = policy.choose(request(request_id="r1"), WORKERS)
    assert (cold.worker_id, cold.num_cached_blocks) == ("B", 0)
    assert cold.worker_costs == {"A": 5.0, "B": 4.0}

    clock.now_s += 59.0
    add_blocks(load, "B", 2)  # B is busier now, but holds the prefix
    warm = policy.choose(request(request_id="r2"), WORKERS)
    assert (warm.policy, warm.worker_id, warm.num_cached_blocks) == ("approx", "B", 4)
    assert warm.worker_costs == {"A": 5.0, "B": 2.0}

    longer = PROMPT + list(range(900, 908))  # 6 blocks, 4 shared
    partial = policy.choose(request(token_ids=longer, request_id="r3"), WORKERS)
    assert (partial.worker_id, partial.num_cached_blocks) == ("B", 4)
    assert partial.worker_costs == {"A": 7.0, "B": 4.0}

    clock.now_s += 60.0  # every entry is exactly ttl_s old now
    assert policy.index.num_entries() == 0
    forgotten = policy.choose(request(request_id="r4"), WORKERS)
    assert (forgotten.worker_id, forgotten.num_cached_blocks) == ("A", 0)


def test_approx_index_refresh_and_remove_worker() -> None:
    clock = FakeClock()
    policy = ApproxPolicy(
        WorkerLoad(BS), KVCostConfig(BS, prefill_scale=1.0), ttl_s=10.0, clock=clock
    )
    hashes = request().block_hashes
    policy.index.record(hashes, "A")
    policy.index.record(hashes[:2], "B")
    assert policy.index.find_matches(hashes).worker_to_medium_blocks == {
        "A": {"GPU": 4},
        "B": {"GPU": 2},
    }
    clock.now_s += 8.0
    policy.index.record(hashes[:1], "A")  # refreshes block 0 only
    clock.now_s += 5.0
    assert policy.index.find_matches(hashes).worker_to_medium_blocks == {"A": {"GPU": 1}}
    policy.index.remove_worker("A")
    assert policy.index.num_entries() == 0


def test_default_prefill_scale_is_the_measured_one() -> None:
    # docs/replay.md: 16 reaches >= 90% of the shared-cache bound on the conversation trace.
    assert KVCostConfig(BS).prefill_scale == DEFAULT_PREFILL_SCALE == 16.0
