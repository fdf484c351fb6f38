"""Trace replay: prompts from hash ids, the shared-cache bound, and the offline simulator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from bench.replay import OfflineReplay, run_offline
from bench.replay_config import ReplayConfig
from bench.replay_online import run_online
from bench.replay_report import shared_cache_hit_rate
from bench.trace import (
    PromptBuilder,
    TraceRequest,
    jitter_arrivals,
    load_mooncake,
    make_synthetic_trace,
    write_mooncake,
)
from serving.engine.timing import TimingProfile
from workflows.bench_cli import app as bench_app

REPO_ROOT = Path(__file__).resolve().parents[2]
# Mooncake's conversation trace (kvcache-ai/Mooncake, FAST25-release/traces/, Apache-2.0): no
# installed package carries it. STRATA_MOONCAKE_TRACE names a copy; else the team's ../shared.
MOONCAKE = Path(
    os.environ.get("STRATA_MOONCAKE_TRACE")
    or Path(__file__).resolve().parents[3] / "shared" / "traces" / "conversation_trace.jsonl"
)
needs_mooncake = pytest.mark.skipif(
    not MOONCAKE.exists(),
    reason=f"Mooncake conversation trace not found at {MOONCAKE} (no package carries it: set "
    "STRATA_MOONCAKE_TRACE to kvcache-ai/Mooncake's FAST25-release/traces/ file)",
)


def make_request(
    index: int, hash_ids: tuple[int, ...], input_length: int, output_length: int = 4, t: float = 0
) -> TraceRequest:
    return TraceRequest(index, t, input_length, output_length, hash_ids)


def make_config(**overrides: object) -> ReplayConfig:
    """A small pool: 4 workers of 32 blocks of 16 tokens (a synthetic trace's block size)."""
    settings: dict[str, object] = {
        "trace": Path("synthetic.jsonl"),
        "workers": 4,
        "routers": ("kv", "round-robin", "least-loaded", "random"),
        "kv_blocks_per_worker": 32,
        "block_size": 16,
        "max_num_batched_tokens": 256,
    }
    settings.update(overrides)
    return ReplayConfig(**settings)


def figures(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "runtime"}


@pytest.fixture(scope="module")
def synthetic() -> list[TraceRequest]:
    """200 requests over 8 shared 6-block prefixes, 2 req/s: the cache, not the load, matters."""
    return make_synthetic_trace(200, block_size=16, rate_per_s=2.0, seed=1)


@pytest.fixture(scope="module")
def synthetic_report(synthetic: list[TraceRequest]) -> dict:
    return run_offline(make_config(), requests=synthetic)


# -- trace loading and prompts --------------------------------------------------------------------


def test_equal_hash_ids_give_identical_blocks_and_distinct_ids_distinct_blocks() -> None:
    builder = PromptBuilder(block_size=8, vocab_size=1000, seed=3)
    a = builder.prompt_token_ids(make_request(0, (1, 2, 3), 20))
    b = builder.prompt_token_ids(make_request(1, (1, 2, 4), 21))
    assert (len(a), len(b)) == (20, 21)
    assert a[:16] == b[:16] == builder.block_tokens(1) + builder.block_tokens(2)
    assert a[16:] != b[16:20]  # partial last blocks come from the request index
    blocks = [tuple(builder.block_tokens(h)) for h in range(200)]
    assert len(set(blocks)) == 200
    assert all(0 <= t < 1000 for block in blocks for t in block)


def test_prompts_are_deterministic_across_builders_and_seeded() -> None:
    request = make_request(7, (0, 5), 1000)
    assert PromptBuilder(512, 32_000).prompt_token_ids(request) == PromptBuilder(
        512, 32_000
    ).prompt_token_ids(request)
    assert PromptBuilder(512, 32_000, seed=1).block_tokens(0) != PromptBuilder(
        512, 32_000
    ).block_tokens(0)


def test_full_last_block_uses_its_hash_id_and_tails_are_unique_per_request() -> None:
    builder = PromptBuilder(block_size=4, vocab_size=50_000)
    exact = builder.prompt_token_ids(make_request(0, (9, 10), 8))
    assert exact == builder.block_tokens(9) + builder.block_tokens(10)
    tails = {tuple(builder.prompt_token_ids(make_request(i, (9,), 7))[4:]) for i in range(100)}
    assert len(tails) == 100


def test_mooncake_round_trip_and_bad_lines(tmp_path: Path) -> None:
    requests = make_synthetic_trace(20, block_size=16, seed=2)
    path = tmp_path / "trace.jsonl"
    write_mooncake(path, requests)
    assert load_mooncake(path) == requests
    assert load_mooncake(path, limit=5) == requests[:5]
    path.write_text('{"timestamp": 5, "input_length": 3, "output_length": 1}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:2"):
        load_mooncake(path)


def test_jitter_keeps_every_request_and_sorts_arrivals(synthetic: list[TraceRequest]) -> None:
    moved = jitter_arrivals(synthetic, window_s=3.0, seed=0)
    assert sorted(r.index for r in moved) == list(range(len(synthetic)))
    assert [r.arrival_s for r in moved] == sorted(r.arrival_s for r in moved)
    assert moved == jitter_arrivals(synthetic, window_s=3.0, seed=0)


@needs_mooncake
def test_mooncake_ids_cover_inputs_and_shared_ids_share_tokens() -> None:
    requests = load_mooncake(MOONCAKE, limit=200)
    assert len(requests) == 200
    assert all(len(r.hash_ids) == -(-r.input_length // 512) for r in requests)
    builder = PromptBuilder(512, 32_000)
    first, second = (builder.prompt_token_ids(r) for r in requests[:2])
    assert requests[0].hash_ids[0] == requests[1].hash_ids[0] == 0
    assert first[:512] == second[:512]
    assert first[512:1024] != second[512:1024]


# -- the shared-cache bound -----------------------------------------------------------------------


def test_shared_cache_counts_leading_cached_blocks_and_evicts_lru() -> None:
    requests = [
        make_request(0, (1, 2, 3), 40),  # 4 blocks of 10, no hits
        make_request(1, (1, 2, 4), 25),  # blocks 1, 2 cached: 20 tokens
        make_request(2, (1, 2, 3), 30),  # 3 full blocks, at most 2 can hit (one is computed)
        make_request(3, (5, 2), 20),  # id 2 behind another prefix is another block: 0
    ]
    hits = 0 + 20 + 20 + 0
    total = 40 + 25 + 30 + 20
    assert shared_cache_hit_rate(requests, 10, None) == hits / total
    # Two blocks: after request 0 the cache holds (1, 2): request 1 hits both, request 2's
    # block (1, 2, 3) was evicted but its first two blocks hit.
    assert shared_cache_hit_rate(requests, 10, 2) == hits / total
    assert shared_cache_hit_rate(requests, 10, 1) == (0 + 10 + 10 + 0) / total


# -- the offline simulator ------------------------------------------------------------------------


def test_single_request_follows_the_timing_model() -> None:
    """One 100-token prompt, 3 outputs: TTFT = one prefill step; ITL = two decode steps."""
    request = make_request(0, (0, 1, 2, 3, 4, 5, 6), 100, output_length=3, t=1.5)
    config = make_config(routers=("kv",), workers=2)
    result = OfflineReplay([request], PromptBuilder(16, 32_000), "kv", config).run()
    profile = TimingProfile()
    assert result.completed == 1
    assert result.output_tokens == 3
    assert result.ttft_s["p50"] == pytest.approx(profile.prefill_ms(100) / 1e3)
    # 7 blocks of 32 are in use during the decodes (100 prompt + <= 2 new tokens).
    assert result.itl_s["p50"] == pytest.approx(profile.decode_ms(7 / 32) / 1e3)
    assert result.makespan_s == pytest.approx(
        (profile.prefill_ms(100) + 2 * profile.decode_ms(7 / 32)) / 1e3
    )
    assert result.per_worker["requests"] == [1.0, 0.0]


def test_every_request_completes_with_all_its_tokens(
    synthetic: list[TraceRequest], synthetic_report: dict
) -> None:
    expected_output = sum(r.output_length for r in synthetic)
    expected_prompt = sum(r.input_length for r in synthetic)
    for name, res in synthetic_report["policies"].items():
        assert res["requests"] == {"total": 200, "completed": 200, "rejected": 0}, name
        assert res["output_tokens"] == expected_output, name
        assert res["prompt_tokens"] == expected_prompt, name
        assert sum(res["per_worker"]["requests"]) == 200, name
        assert sum(res["per_worker"]["prompt_tokens"]) == expected_prompt, name


def test_same_seed_gives_identical_figures(
    synthetic: list[TraceRequest], synthetic_report: dict
) -> None:
    again = run_offline(make_config(), requests=synthetic)
    assert json.dumps(figures(again), sort_keys=True) == json.dumps(
        figures(synthetic_report), sort_keys=True
    )


def test_kv_routing_beats_round_robin_on_shared_prefixes(synthetic_report: dict) -> None:
    policies = synthetic_report["policies"]
    assert policies["kv"]["hit_rate"] > policies["round-robin"]["hit_rate"] + 0.05
    assert policies["kv"]["router_predicted_hit_rate"] > 0
    assert policies["round-robin"]["router_predicted_hit_rate"] is None


def test_shared_cache_bound_is_above_every_policy(synthetic_report: dict) -> None:
    bound = synthetic_report["shared_cache"]["hit_rate"]
    assert bound <= synthetic_report["shared_cache"]["unbounded_hit_rate"]
    for name, res in synthetic_report["policies"].items():
        assert 0 < res["hit_rate"] <= bound, name


def test_prompts_larger_than_a_worker_are_rejected_and_counted() -> None:
    requests = [make_request(0, (0,), 10), make_request(1, tuple(range(1, 11)), 150, t=0.1)]
    config = make_config(routers=("round-robin",), workers=2, kv_blocks_per_worker=8)
    result = OfflineReplay(requests, PromptBuilder(16, 32_000), "round-robin", config).run()
    assert (result.completed, result.rejected) == (1, 1)


@needs_mooncake
def test_mooncake_head_replays_with_the_bound_above_every_policy() -> None:
    config = ReplayConfig(
        trace=MOONCAKE,
        workers=4,
        routers=("kv", "round-robin"),
        kv_blocks_per_worker=256,
        limit=200,
    )
    report = run_offline(config)
    bound = report["shared_cache"]["hit_rate"]
    assert report["trace"]["hash_coverage_mismatches"] == 0
    for name, res in report["policies"].items():
        assert res["requests"]["completed"] == 200, name
        assert 0 < res["hit_rate"] <= bound, name
        assert res["ttft_s"]["p50"] <= res["ttft_s"]["p90"] <= res["ttft_s"]["p99"], name


# -- the command ----------------------------------------------------------------------------------


def test_cli_writes_the_report_and_checks_online_mode(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_mooncake(trace, make_synthetic_trace(30, block_size=16, seed=4))
    out = tmp_path / "report.json"
    args = ["replay", "--trace", str(trace), "--workers", "2", "--block-size", "16"]
    result = CliRunner().invoke(bench_app, [*args, "--router", "kv,round-robin", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["policies"]) == ["kv", "round-robin"]
    assert report["policies"]["kv"]["requests"]["completed"] == 30
    # No --url: online mode starts `strata serve`, which needs a checkpoint for its tokenizer.
    online = CliRunner().invoke(bench_app, [*args, "--mode", "online", "--model", str(tmp_path)])
    assert online.exit_code == 1
    assert "no config.json" in online.output
    bad = CliRunner().invoke(bench_app, [*args, "--router", "nearest"])
    assert bad.exit_code == 2


# -- online mode against a real mock worker -------------------------------------------------------


@pytest.fixture(scope="module")
def mock_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``python -m serving.worker --engine mock`` process (16-token blocks, 20x speed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path_factory.mktemp("worker") / "worker.log").open("w")
    cmd = [sys.executable, "-m", "serving.worker", "--engine", "mock", "--vocab-size", "32000"]
    cmd += ["--port", str(port), "--block-size", "16", "--num-blocks", "512", "--speedup", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, "worker not healthy after 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_online_replay_streams_every_request_from_a_mock_worker(mock_worker: str) -> None:
    requests = make_synthetic_trace(24, block_size=16, rate_per_s=2.0, seed=5)
    config = make_config(mode="online", url=mock_worker, routers=("kv",), speedup=8.0)
    report = run_online(config, requests=requests)
    res = report["policies"]["kv"]
    assert res["requests"] == {"total": 24, "completed": 24, "rejected": 0}, res["errors"]
    assert res["output_tokens"] == sum(r.output_length for r in requests)
    assert 0 < res["hit_rate"] <= report["shared_cache"]["unbounded_hit_rate"]
    assert 0 < res["ttft_s"]["p50"] <= res["ttft_s"]["p99"] < 5
    assert 0 < res["itl_s"]["p50"] < 1


@pytest.mark.slow
def test_online_mode_starts_strata_serve_per_policy(smollm2_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_mooncake(trace, make_synthetic_trace(16, block_size=16, seed=5))
    out = tmp_path / "online.json"
    args = ["replay", "--trace", str(trace), "--workers", "2", "--block-size", "16",
            "--kv-blocks-per-worker", "256", "--mode", "online", "--speedup", "10",
            "--router", "kv,round-robin", "--model", str(smollm2_dir)]  # fmt: skip
    args += ["--out", str(out)]
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["policies"]) == ["kv", "round-robin"]
    for figures in report["policies"].values():
        assert figures["requests"]["completed"] == 16
