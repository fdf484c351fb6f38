"""The cost check's prefill speed: a step's fixed cost is not charged per token."""

from __future__ import annotations

import pytest

from serving.kvcache.policy import CostModel

BLOCK_BYTES = 2 << 20  # Llama-3-8B, bf16, 16 tokens a block


def test_small_steps_do_not_make_a_long_recompute_look_dear() -> None:
    # H100 figures from bench/kv_tiers.py: 16,416 tokens in 470 ms, a 33-token step 25 ms.
    cost = CostModel.make(16, BLOCK_BYTES)
    for _ in range(5):
        cost.observe_prefill(16_416, 0.470)
        cost.observe_prefill(33, 0.025)
    per_token_s = (0.470 - 0.025) / (16_416 - 33)
    assert cost.prefill_s_per_token == pytest.approx(per_token_s, rel=0.01)
    assert cost.recompute_s(1024) == pytest.approx(0.445, rel=0.02)
    # 2 GiB from a 2 GB/s disk (1.07 s) loses to recomputing it; from a 50 GB/s pinned host wins.
    cost.speeds["G3"].bandwidth_bytes_per_s = 2e9
    cost.speeds["G2"].bandwidth_bytes_per_s = 50e9
    assert not cost.decide(["G3"] * 1024).onboard
    assert cost.decide(["G2"] * 1024).num_blocks == 1024


def test_steps_of_one_size_give_their_ratio() -> None:
    cost = CostModel.make(16, BLOCK_BYTES)
    for _ in range(3):
        cost.observe_prefill(512, 1.0)
    assert cost.prefill_s_per_token == pytest.approx(1.0 / 512)
    cost.observe_prefill(8, 5.0)  # under the minimum: latency, not speed
    assert cost.prefill_s_per_token == pytest.approx(1.0 / 512)


def test_the_fit_follows_a_machine_that_got_faster() -> None:
    cost = CostModel.make(16, BLOCK_BYTES)
    for _ in range(20):
        cost.observe_prefill(2048, 2.0)
        cost.observe_prefill(256, 0.3)
    slow = cost.prefill_s_per_token
    for _ in range(200):
        cost.observe_prefill(2048, 1.0)
        cost.observe_prefill(256, 0.15)
    assert cost.prefill_s_per_token == pytest.approx(slow / 2, rel=0.02)
