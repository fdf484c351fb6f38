"""The mock engine: the real scheduler and block manager, compute replaced by a timing model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.engine.config import EngineConfig
from serving.engine.core import EngineCore
from serving.engine.factory import build_engine
from serving.engine.request import Request, SamplingParams
from serving.engine.scheduler import SchedulerConfig
from serving.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from serving.engine.timing import MockModelRunner, TimingProfile


def seq(req_id: str, num_tokens: int, num_output_tokens: int = 0) -> ScheduledSeq:
    return ScheduledSeq(
        req_id=req_id,
        token_ids=[1] * num_tokens,
        start_pos=0,
        block_ids=[0],
        sample=True,
        sampling_params=SamplingParams(),
        num_output_tokens=num_output_tokens,
    )


def test_default_profile_is_the_documented_formula() -> None:
    profile = TimingProfile()
    assert profile.prefill_ms(1000) == pytest.approx(4.21e-7 * 1000**2 + 0.0152 * 1000 + 16.5)
    assert profile.prefill_ms(0) == 0.0
    assert profile.decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    assert profile.decode_ms(1.7) == profile.decode_ms(1.0)  # clamped to [0, 1]


def test_step_time_sums_prefill_and_decode_and_honours_speedup() -> None:
    runner = MockModelRunner(vocab_size=100, num_blocks=10, speedup=2.0)
    mixed = SchedulerOutput(seqs=[seq("a", 500), seq("b", 1, 3), seq("c", 1, 9)], kv_usage=0.25)
    expected_ms = TimingProfile().prefill_ms(500) + TimingProfile().decode_ms(0.25)
    assert runner.step_time_s(mixed) == pytest.approx(expected_ms / 1000 / 2)
    decode_only = SchedulerOutput(seqs=[seq("b", 1, 3)], kv_usage=0.0)
    assert runner.step_time_s(decode_only) == pytest.approx(5.74 / 1000 / 2)
    # A preempted request recomputing prompt + outputs is prefill work, not a decode.
    recompute = SchedulerOutput(seqs=[seq("d", 40, 5)], kv_usage=0.0)
    assert runner.step_time_s(recompute) == pytest.approx(TimingProfile().prefill_ms(40) / 2000)


def test_profile_from_json_interpolates_measured_points(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps({"prefill": [[0, 10], [1000, 110]], "decode": {"coeffs_ms": [2, 3]}})
    )
    profile = TimingProfile.from_json(path)
    assert profile.prefill_ms(500) == pytest.approx(60.0)
    assert profile.decode_ms(0.5) == pytest.approx(4.0)
    path.write_text(json.dumps({"prefill": [[10, 1], [5, 2]]}))
    with pytest.raises(ValueError, match=r"profile\.json.*sorted"):
        TimingProfile.from_json(path)


def test_tokens_are_deterministic_and_never_eos() -> None:
    runner = MockModelRunner(vocab_size=3, num_blocks=10, excluded_token_ids=[0, 1])
    out = runner.execute_model(SchedulerOutput(seqs=[seq("a", 4), seq("b", 4)]))
    assert out.sampled_token_ids == {"a": 2, "b": 2}
    big = MockModelRunner(vocab_size=50_000, num_blocks=10, seed=3)
    first = big.execute_model(SchedulerOutput(seqs=[seq("a", 4)])).sampled_token_ids
    again = big.execute_model(SchedulerOutput(seqs=[seq("a", 4)])).sampled_token_ids
    assert first == again


def test_mock_engine_runs_to_max_tokens_in_virtual_time() -> None:
    now = [0.0]
    runner = MockModelRunner(vocab_size=1000, num_blocks=64, excluded_token_ids=[0])
    core = EngineCore(runner, SchedulerConfig(max_model_len=4096), clock=lambda: now[0])
    for i in range(4):
        core.add_request(
            Request(f"r{i}", list(range(1, 101)), SamplingParams(max_tokens=10), eos_token_id=0)
        )
    tokens: dict[str, list[int]] = {}
    total_s = 0.0
    while core.has_unfinished_requests():
        result = core.step()
        now[0] += result.step_duration_s
        total_s += result.step_duration_s
        for out in result.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert {k: len(v) for k, v in tokens.items()} == {f"r{i}": 10 for i in range(4)}
    # Step 1 prefills r0 fully (100 tokens) and the three others hit its 6 cached blocks.
    events = core.take_kv_events()
    assert events and type(events[0]).__name__ == "BlockStored"
    assert total_s > 0


def test_mock_and_real_engine_emit_the_same_prompt_block_events(smollm2_dir: Path) -> None:
    """Same prompts, same scheduler: the BlockStored events for prompt blocks are identical."""
    prompts = [list(range(10, 60)), list(range(10, 40)) + list(range(200, 230))]

    def stored(engine: str) -> list[tuple]:
        loaded = build_engine(
            EngineConfig(model_dir=smollm2_dir, engine=engine, num_blocks=64, max_model_len=512)
        )
        for i, prompt in enumerate(prompts):
            loaded.core.add_request(
                Request(f"r{i}", prompt, SamplingParams(max_tokens=1, temperature=0))
            )
        while loaded.core.has_unfinished_requests():
            loaded.core.step()
        return [
            (tuple(e.block_hashes), e.parent_block_hash, tuple(e.token_ids), e.medium)
            for e in loaded.core.take_kv_events()
            if type(e).__name__ == "BlockStored"
        ]

    assert stored("mock") == stored("builtin")


def test_mock_without_model_needs_vocab_size() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        EngineConfig(engine="mock")
    loaded = build_engine(EngineConfig(engine="mock", vocab_size=32_000, num_blocks=16))
    assert loaded.tokenizer is None and loaded.info.max_model_len == 16 * 16
