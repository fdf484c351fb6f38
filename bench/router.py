"""Router benchmark: KV-event ingest rate and routing-decision latency, against plain dicts.

    .venv/bin/python bench/router.py [--num-blocks 100000] [--num-workers 16] [--block-size 16]

Builds a synthetic cluster: shared prefixes (system prompts, documents) of 1k-4k tokens, each
continued by per-session suffixes to 2k-8k tokens, stored by 16 workers through vLLM-shaped
``BlockStored`` events (up to 64 blocks per event, chained by engine hashes) until the index holds
``--num-blocks`` blocks. Then routes requests that continue a session, start one on a known prefix
or are new. Baselines in the same run: ingest = inserting the same engine hashes into a dict;
lookup = ``dict.get`` of the request's chain hashes in a dict of every indexed hash.
Prints a table and writes ``bench/results/router.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.protocol.kv_events import BlockHash, BlockStored
from serving.router.indexer import KVIndexer, hash_token_ids
from serving.router.policies import (
    ApproxPolicy,
    KVCostConfig,
    KVPolicy,
    RequestView,
    WorkerLoad,
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "router.json"
VOCAB_SIZE = 128_000
MAX_BLOCKS_PER_EVENT = 64


@dataclass
class Workload:
    worker_events: list[tuple[str, BlockStored]]
    sessions: list[list[int]]  # token ids each worker holds, per session
    prefixes: list[list[int]]
    num_blocks: int


def random_tokens(rng: random.Random, num_tokens: int) -> list[int]:
    return [rng.randrange(VOCAB_SIZE) for _ in range(num_tokens)]


def block_multiple(num_tokens: int, block_size: int) -> int:
    return num_tokens - num_tokens % block_size


def make_workload(
    num_blocks: int, num_workers: int, block_size: int, rng: random.Random
) -> Workload:
    """Sessions spread over workers until ``num_blocks`` blocks are stored (engine-side dedup:
    a worker stores a shared prefix once and later sessions chain from its last block)."""
    prefixes = [
        random_tokens(rng, block_multiple(rng.randint(1024, 4096), block_size)) for _ in range(64)
    ]
    worker_prefix_tail: list[dict[int, int]] = [{} for _ in range(num_workers)]
    events: list[tuple[str, BlockStored]] = []
    sessions: list[list[int]] = []
    stored = 0
    while stored < num_blocks:
        worker = rng.randrange(num_workers)
        group = min(int(rng.paretovariate(1.2)) - 1, len(prefixes) - 1)  # popular prefixes
        prefix = prefixes[group]
        suffix_tokens = block_multiple(rng.randint(2048, 8192) - len(prefix), block_size)
        tokens = prefix + random_tokens(rng, max(suffix_tokens, block_size))
        parent = worker_prefix_tail[worker].get(group)
        start = len(prefix) if parent is not None else 0
        engine_hashes = [rng.getrandbits(64) for _ in range((len(tokens) - start) // block_size)]
        if parent is None:
            worker_prefix_tail[worker][group] = engine_hashes[len(prefix) // block_size - 1]
        engine_hashes = engine_hashes[: num_blocks - stored]
        for i in range(0, len(engine_hashes), MAX_BLOCKS_PER_EVENT):
            chunk = engine_hashes[i : i + MAX_BLOCKS_PER_EVENT]
            first = start + i * block_size
            token_ids = tokens[first : first + len(chunk) * block_size]
            events.append(
                (
                    f"worker-{worker}",
                    BlockStored(
                        block_hashes=chunk,
                        parent_block_hash=parent,
                        token_ids=token_ids,
                        block_size=block_size,
                        medium="GPU",
                    ),
                )
            )
            parent = chunk[-1]
        stored += len(engine_hashes)
        sessions.append(tokens[: start + len(engine_hashes) * block_size])
    return Workload(events, sessions, prefixes, stored)


def make_requests(
    workload: Workload, num_requests: int, block_size: int, rng: random.Random
) -> list[list[int]]:
    """50% continue a session, 40% start one on a known prefix, 10% share nothing; 2k-8k."""
    requests: list[list[int]] = []
    for _ in range(num_requests):
        kind = rng.random()
        if kind < 0.5:
            base = rng.choice(workload.sessions)[:7168]
        elif kind < 0.9:
            base = rng.choice(workload.prefixes)
        else:
            base = []
        total = max(rng.randint(2048, 8192), len(base) + block_size)
        requests.append(base + random_tokens(rng, total - len(base)))
    return requests


def ingest(workload: Workload, block_size: int) -> tuple[KVIndexer, dict[str, float]]:
    """Seconds to apply every event to a fresh KVIndexer; to hash the events' tokens only; and
    to put the same engine hashes in a dict (the baseline)."""
    indexer = KVIndexer(block_size)
    gc.collect()
    start = time.perf_counter()
    for worker_id, event in workload.worker_events:
        indexer.apply_event(worker_id, event)
    index_s = time.perf_counter() - start

    start = time.perf_counter()
    for _worker_id, event in workload.worker_events:
        hash_token_ids(event.token_ids, block_size)
    hash_s = time.perf_counter() - start

    baseline: dict[str, dict[BlockHash, BlockHash | None]] = {}
    gc.collect()
    start = time.perf_counter()
    for worker_id, event in workload.worker_events:
        held = baseline.setdefault(worker_id, {})
        parent = event.parent_block_hash
        for engine_hash in event.block_hashes:
            held[engine_hash] = parent
            parent = engine_hash
    dict_s = time.perf_counter() - start
    return indexer, {"index": index_s, "hash": hash_s, "dict": dict_s}


def percentile_us(samples_ns: list[int], q: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] / 1000


def time_decisions(
    indexer: KVIndexer, workload: Workload, requests: list[list[int]], block_size: int
) -> dict[str, list[int]]:
    """Per request, nanoseconds for each stage of a decision and for the dict baseline."""
    worker_ids = indexer.worker_ids()
    load = WorkerLoad(block_size)
    config = KVCostConfig(block_size)
    kv = KVPolicy(indexer, load, config, seed=0)
    clock_s = [0.0]
    approx = ApproxPolicy(load, config, ttl_s=1e9, clock=lambda: clock_s[0])
    lookup: dict[int, int] = {}
    for token_ids in workload.sessions:
        for block_hash in hash_token_ids(token_ids, block_size):
            lookup[block_hash] = 1  # the same chain hashes as the index holds
    samples: dict[str, list[int]] = {k: [] for k in ("hash", "match", "choose", "total", "dict")}
    samples["approx"] = []
    matched_blocks: list[int] = []
    for i, token_ids in enumerate(requests):
        t0 = time.perf_counter_ns()
        hashes = indexer.hash_request(token_ids)
        t1 = time.perf_counter_ns()
        matches = indexer.find_matches(hashes)
        t2 = time.perf_counter_ns()
        view = RequestView(f"r{i}", len(token_ids), hashes)
        decision = kv.choose(view, worker_ids)
        t3 = time.perf_counter_ns()
        get = lookup.get
        for h in hashes:
            get(h)
        t4 = time.perf_counter_ns()
        approx.choose(view, worker_ids)
        t5 = time.perf_counter_ns()
        samples["hash"].append(t1 - t0)
        samples["match"].append(t2 - t1)
        samples["choose"].append(t3 - t2)  # find_matches again, plus 16 costs
        samples["total"].append((t1 - t0) + (t3 - t2))
        samples["dict"].append(t4 - t3)
        samples["approx"].append(t5 - t4)
        matched_blocks.append(decision.num_cached_blocks)
        del matches
    samples["matched_blocks"] = matched_blocks
    samples["request_blocks"] = [len(t) // block_size for t in requests]
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-blocks", type=int, default=100_000)
    parser.add_argument("--num-workers", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="ingest runs (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    workload = make_workload(args.num_blocks, args.num_workers, args.block_size, rng)
    timings: list[dict[str, float]] = []
    for _ in range(args.repeats):
        indexer, seconds = ingest(workload, args.block_size)  # each run starts from empty
        timings.append(seconds)
    ingest_s = {k: statistics.median(t[k] for t in timings) for k in ("index", "hash", "dict")}
    requests = make_requests(workload, args.num_requests, args.block_size, rng)
    time_decisions(indexer, workload, requests[:100], args.block_size)  # warm-up
    samples = time_decisions(indexer, workload, requests, args.block_size)

    stages = ("hash", "match", "choose", "total", "dict", "approx")
    latency = {
        stage: {
            "p50_us": percentile_us(samples[stage], 0.50),
            "p99_us": percentile_us(samples[stage], 0.99),
        }
        for stage in stages
    }
    result = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "python": sys.version},
        "machine": platform.platform(),
        "indexed_blocks": workload.num_blocks,
        "distinct_router_blocks": len(indexer),
        "num_events": len(workload.worker_events),
        "ingest_s": ingest_s["index"],
        "ingest_blocks_per_s": workload.num_blocks / ingest_s["index"],
        "hash_only_blocks_per_s": workload.num_blocks / ingest_s["hash"],
        "baseline_dict_blocks_per_s": workload.num_blocks / ingest_s["dict"],
        "ingest_time_ratio_vs_dict": ingest_s["index"] / ingest_s["dict"],
        "decision_latency": latency,
        "match_time_ratio_vs_dict_p50": latency["match"]["p50_us"] / latency["dict"]["p50_us"],
        "mean_request_blocks": statistics.fmean(samples["request_blocks"]),
        "mean_matched_blocks": statistics.fmean(samples["matched_blocks"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(result: dict) -> None:
    console = Console()
    ingest_table = Table(title="KV-event ingest (median of runs)")
    columns = ("blocks", "events", "KVIndexer blocks/s", "hashing only", "dict (baseline)")
    for column in (*columns, "time vs dict"):
        ingest_table.add_column(column, justify="right")
    ingest_table.add_row(
        f"{result['indexed_blocks']:,}",
        f"{result['num_events']:,}",
        f"{result['ingest_blocks_per_s']:,.0f}",
        f"{result['hash_only_blocks_per_s']:,.0f}",
        f"{result['baseline_dict_blocks_per_s']:,.0f}",
        f"{result['ingest_time_ratio_vs_dict']:.1f}x",
    )
    console.print(ingest_table)
    labels = {
        "hash": "hash prompt (XXH3 chain)",
        "match": "find_matches",
        "choose": "KVPolicy.choose (match + 16 costs)",
        "total": "decision = hash + choose",
        "dict": "baseline: dict.get per block",
        "approx": "ApproxPolicy.choose (+ record)",
    }
    table = Table(
        title=(
            f"Routing decision, {result['config']['num_workers']} workers, "
            f"{result['mean_request_blocks']:.0f} blocks/request mean, "
            f"{result['mean_matched_blocks']:.0f} matched"
        )
    )
    for column in ("stage", "p50 (us)", "p99 (us)"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage, label in labels.items():
        figures = result["decision_latency"][stage]
        table.add_row(label, f"{figures['p50_us']:,.1f}", f"{figures['p99_us']:,.1f}")
    console.print(table)
    console.print(
        f"find_matches / dict lookup (p50): {result['match_time_ratio_vs_dict_p50']:.2f}x"
    )


if __name__ == "__main__":
    main()
