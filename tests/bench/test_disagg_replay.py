"""Offline replay with prefill/decode pools: remote prefill, KV pulls, leases, decisions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.disagg import main as disagg_main
from bench.disagg import make_workload
from bench.replay import OfflineReplay, PolicyResult, ReplayConfig
from bench.trace import PromptBuilder, TraceRequest, make_synthetic_trace, write_mooncake
from serving.engine.timing import TimingProfile
from workflows.bench_cli import app as bench_app

BLOCK_SIZE = 16
KV_BYTES_PER_TOKEN = 131_072  # MockModelRunner's default


def make_config(**overrides: object) -> ReplayConfig:
    """1 prefill + 1 decode engine of 256 blocks of 16 tokens, kv routing."""
    settings: dict[str, object] = {
        "trace": Path("synthetic.jsonl"),
        "workers": 0,
        "prefill_workers": 1,
        "decode_workers": 1,
        "routers": ("kv",),
        "kv_blocks_per_worker": 256,
        "block_size": BLOCK_SIZE,
        "max_num_batched_tokens": 512,
    }
    settings.update(overrides)
    return ReplayConfig(**settings)


def replay(
    requests: list[TraceRequest], config: ReplayConfig
) -> tuple[OfflineReplay, PolicyResult]:
    sim = OfflineReplay(requests, PromptBuilder(BLOCK_SIZE, 32_000), config.routers[0], config)
    return sim, sim.run()


@pytest.fixture(scope="module")
def shared_prefixes() -> list[TraceRequest]:
    """120 requests over 4 shared 20-block prefixes (about 350 tokens each) and 40 with prompts
    of their own (300-700 tokens), 8 req/s in all.

    A prompt the decode engine has not seen is 100% uncached: remote. Once it holds a shared
    prefix, the 1-3 new blocks are under 70% of the prompt: local_short.
    """
    shared = make_synthetic_trace(
        120,
        num_groups=4,
        prefix_blocks=20,
        max_suffix_blocks=3,
        output_length=(8, 24),
        rate_per_s=6.0,
        block_size=BLOCK_SIZE,
        seed=7,
    )
    rng = random.Random(7)
    next_id = 1 + max(h for r in shared for h in r.hash_ids)
    span = shared[-1].arrival_s
    mixed = [(r.arrival_s, r.input_length, r.output_length, r.hash_ids) for r in shared]
    for _ in range(40):
        n = rng.randint(300, 700)
        ids = tuple(range(next_id, next_id + n // BLOCK_SIZE))
        next_id += len(ids)
        mixed.append((round(rng.uniform(0, span), 3), n, rng.randint(8, 24), ids))
    mixed.sort()
    return [TraceRequest(i, *fields) for i, fields in enumerate(mixed)]


def assert_drained(sim: OfflineReplay, result: PolicyResult, requests: list[TraceRequest]) -> None:
    """Every request finished with all its tokens; no lease, pull or block left anywhere."""
    figures = result.to_dict()
    assert figures["requests"] == {
        "total": len(requests),
        "completed": len(requests),
        "rejected": 0,
    }
    assert result.output_tokens == sum(r.output_length for r in requests)
    assert result.prompt_tokens == sum(r.input_length for r in requests)
    assert sorted(result.request_ttft_s) == sorted(str(r.index) for r in requests)
    assert sum(figures["per_worker"]["requests"]) == len(requests)
    assert figures["leases_outstanding_at_end"] == 0
    for engine in sim.engines:
        assert not engine.leases
        assert not engine.scheduler.waiting_for_kv
        assert not engine.has_unfinished_requests()
        pool = engine.kv_cache_manager.block_pool
        assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize(
    ("workers", "prefill", "decode"), [(0, 1, 1), (1, 1, 1)], ids=["1P+1D", "1A+1P+1D"]
)
def test_remote_and_local_prefill_both_happen_and_everything_drains(
    shared_prefixes: list[TraceRequest], workers: int, prefill: int, decode: int
) -> None:
    config = make_config(workers=workers, prefill_workers=prefill, decode_workers=decode)
    sim, result = replay(shared_prefixes, config)
    assert_drained(sim, result, shared_prefixes)
    figures = result.to_dict()
    decisions = figures["disagg_decisions"]
    assert decisions["remote"] > 0
    assert decisions["local_short"] > 0
    assert sum(decisions.values()) == len(shared_prefixes)
    transfer = figures["kv_transfer"]
    assert transfer["pulls"] == decisions["remote"]
    assert transfer["failed"] == 0
    assert transfer["bytes"] == transfer["tokens"] * KV_BYTES_PER_TOKEN
    assert transfer["time_s_total"] == pytest.approx(transfer["bytes"] / 25e9)
    roles = dict(zip(figures["workers"]["ids"], figures["workers"]["roles"], strict=True))
    requests_served = dict(zip(roles, figures["per_worker"]["requests"], strict=True))
    assert requests_served["p0"] == 0  # a prefill engine serves no client
    if workers:
        assert roles["w0"] == "both" and requests_served["w0"] > 0  # a decode target too
    assert set(figures["ttft_s_by_decision"]) == set(decisions)


def test_one_remote_request_follows_the_timing_and_transfer_model() -> None:
    """TTFT = prefill step on the prefill engine + pull of n-1 tokens + the decode engine's
    step that recomputes the last prompt token (priced as a decode step); the prefill engine's
    token is not counted."""
    n = 300
    request = TraceRequest(0, 0.5, n, 3, tuple(range(n // BLOCK_SIZE)))
    config = make_config(kv_bandwidth_gbps=10.0)
    sim, result = replay([request], config)
    assert_drained(sim, result, [request])
    profile = TimingProfile()
    pull_s = (n - 1) * KV_BYTES_PER_TOKEN / 10e9
    # The recompute is one token after n-1 of context: a decode-priced step, at the usage of
    # the request's 19 blocks out of 256.
    recompute_s = profile.decode_ms(-(-n // BLOCK_SIZE) / 256) / 1e3
    expected = profile.prefill_ms(n) / 1e3 + pull_s + recompute_s
    assert result.ttft_s["p50"] == pytest.approx(expected)
    assert result.output_tokens == 3
    figures = result.to_dict()
    assert figures["disagg_decisions"] == {"remote": 1}
    assert figures["kv_transfer"]["tokens"] == n - 1
    assert figures["per_worker"]["prompt_tokens"] == [n, 0]  # computed on p0
    assert figures["per_worker"]["requests"] == [0, 1]  # served by d0


def test_lower_bandwidth_shows_up_in_remote_ttft(shared_prefixes: list[TraceRequest]) -> None:
    fast = replay(shared_prefixes, make_config())[1].to_dict()
    slow_sim, slow_result = replay(shared_prefixes, make_config(kv_bandwidth_gbps=0.05))
    assert_drained(slow_sim, slow_result, shared_prefixes)
    slow = slow_result.to_dict()
    # ~350 tokens * 128 KiB at 0.05 GB/s is ~0.9 s per pull, ~2 ms at 25 GB/s.
    assert slow["kv_transfer"]["time_s"]["p50"] > 0.5
    fast_ttft = fast["ttft_s_by_decision"]["remote"]["p50"]
    slow_ttft = slow["ttft_s_by_decision"]["remote"]["p50"]
    assert slow_ttft > fast_ttft + 0.5


def test_expired_leases_fall_back_to_local_prefill(shared_prefixes: list[TraceRequest]) -> None:
    """With leases shorter than the wait for a pull, the decode engine prefills itself."""
    config = make_config(kv_bandwidth_gbps=0.05, kv_lease_s=0.2)
    sim, result = replay(shared_prefixes, config)
    assert_drained(sim, result, shared_prefixes)
    figures = result.to_dict()
    assert figures["kv_transfer"]["failed"] > 0
    assert figures["leases_expired"] > 0


def test_aggregated_config_reports_no_decisions_and_decode_only_pool_matches_it(
    shared_prefixes: list[TraceRequest],
) -> None:
    """No prefill engines: every prompt is computed where the request decodes, so a pool of
    decode-only engines replays exactly as the same number of aggregated engines."""
    aggregated = replay(
        shared_prefixes, make_config(workers=2, prefill_workers=0, decode_workers=0)
    )
    decode_only = replay(
        shared_prefixes, make_config(workers=0, prefill_workers=0, decode_workers=2)
    )
    agg = aggregated[1].to_dict()
    dec = decode_only[1].to_dict()
    assert not {"disagg_decisions", "kv_transfer", "workers"} & set(agg)
    decisions = dec.pop("disagg_decisions")
    assert decisions == {"aggregated": len(shared_prefixes)}  # as the frontend counts them
    assert dec.pop("kv_transfer")["pulls"] == 0
    for key in ("workers", "ttft_s_by_decision", "leases_expired", "leases_outstanding_at_end"):
        dec.pop(key)
    assert json.dumps(dec, sort_keys=True) == json.dumps(agg, sort_keys=True)


def test_config_needs_a_decode_target_and_offline_mode() -> None:
    with pytest.raises(ValueError, match="no engine can decode"):
        make_config(workers=0, decode_workers=0)
    with pytest.raises(ValueError, match="online mode"):
        make_config(mode="online", url="http://127.0.0.1:1/v1")


def test_cli_runs_prefill_and_decode_pools(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_mooncake(trace, make_synthetic_trace(30, block_size=16, seed=4))
    out = tmp_path / "report.json"
    args = ["replay", "--trace", str(trace), "--block-size", "16", "--prefill", "1"]
    args += ["--decode", "2", "--kv-bandwidth-gbps", "5", "--max-local-prefill-tokens", "64"]
    result = CliRunner().invoke(bench_app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "prefill decisions" in result.output
    report = json.loads(out.read_text())
    cfg = report["config"]
    assert (cfg["workers"], cfg["prefill_workers"], cfg["decode_workers"]) == (0, 1, 2)
    assert cfg["kv_bandwidth_gbps"] == 5.0 and cfg["max_local_prefill_tokens"] == 64
    figures = report["policies"]["kv"]
    assert figures["requests"]["completed"] == 30
    assert figures["workers"]["ids"] == ["p0", "d0", "d1"]
    online = CliRunner().invoke(bench_app, [*args, "--mode", "online", "--url", "http://x/v1"])
    assert online.exit_code == 2
    assert "online mode" in online.output


def test_workload_is_deterministic_and_mixes_both_kinds() -> None:
    requests, long_ids = make_workload(rate_per_s=10, long_fraction=0.2, num_requests=200, seed=3)
    again, _ = make_workload(rate_per_s=10, long_fraction=0.2, num_requests=200, seed=3)
    assert requests == again and len(requests) == 200
    assert 20 < len(long_ids) < 60
    for r in requests:
        long = r.index in long_ids
        assert 6_000 <= r.input_length <= 12_000 if long else 200 <= r.input_length <= 500
        assert len(r.hash_ids) == -(-r.input_length // 16)
    ids = [h for r in requests for h in r.hash_ids]
    assert len(ids) == len(set(ids))  # no shared prefixes
    prefixed, _ = make_workload(
        rate_per_s=10, long_fraction=0.2, num_requests=50, seed=3, system_prompt_tokens=1024
    )
    assert all(r.hash_ids[:64] == tuple(range(64)) for r in prefixed if r.index not in long_ids)


def test_bench_runs_three_layouts_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "disagg.json"
    payload = disagg_main(["--requests", "40", "--rate", "8", "--out", str(out)])
    assert json.loads(out.read_text())["workload"]["requests"] == 40
    assert list(payload["layouts"]) == ["aggregated 4", "1P + 3D", "2P + 2D"]
    for name, figures in payload["layouts"].items():
        assert figures["requests"]["completed"] == 40, name
        assert figures.get("leases_outstanding_at_end", 0) == 0, name
