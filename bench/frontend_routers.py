"""Routing quality with several frontend processes, each with its own router (offline replay).

``python -m bench.frontend_routers --trace T [--processes 1,2,4]``: the KV-routed offline replay
of ``bench.replay`` (mock engines, virtual time, no I/O), where requests reach one of N
independent routers as ``SO_REUSEPORT`` spreads a client's connections over N processes
(uniformly at random, seeded). Every router reads every worker's KV events (its index is
complete) but counts only the load of the requests it routed itself: what several frontend
processes on one port see. The figure is the prefix-cache hit rate (and TTFT) against one
process, in the same run; the goal is a hit rate within 2% of it.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.replay import OfflineReplay, PolicyResult, PromptBuilder, ReplayConfig, load_requests
from bench.trace import TraceRequest
from serving.engine.timing import TimingProfile
from serving.protocol.kv_events import KVCacheEvent
from serving.router.indexer import KVIndexer, PrefixMatches
from serving.router.policies import RoutingPolicy, WorkerLoad


class _LoadByOwner(WorkerLoad):
    """The replay's one ``WorkerLoad`` seen through N routers: each request's updates go to
    the load of the router that routed it (``owner``, set before routing)."""

    def __init__(self, loads: list[WorkerLoad]) -> None:
        super().__init__(loads[0].block_size)
        self.loads = loads
        self.owner = 0
        self._owner_of: dict[str, int] = {}

    def add_request(self, request_id: str, worker_id: str, num_prompt_tokens: int,
                    num_cached_tokens: int = 0) -> None:  # fmt: skip
        self._owner_of[request_id] = self.owner
        self.loads[self.owner].add_request(request_id, worker_id, num_prompt_tokens,
                                           num_cached_tokens)  # fmt: skip

    def mark_prefill_done(self, request_id: str) -> None:
        self._load(request_id).mark_prefill_done(request_id)

    def add_output_tokens(self, request_id: str, num_tokens: int) -> None:
        self._load(request_id).add_output_tokens(request_id, num_tokens)

    def finish_request(self, request_id: str) -> None:
        self._load(request_id).finish_request(request_id)
        self._owner_of.pop(request_id, None)

    def _load(self, request_id: str) -> WorkerLoad:
        return self.loads[self._owner_of.get(request_id, 0)]


class _IndexFanout(KVIndexer):
    """Every router's index gets every worker's events (each process subscribes to all)."""

    def __init__(self, indexers: list[KVIndexer]) -> None:
        super().__init__(indexers[0].block_size)
        self.indexers = indexers

    def add_worker(self, worker_id: str) -> None:
        for indexer in self.indexers:
            indexer.add_worker(worker_id)

    def apply_events(self, worker_id: str, events: Sequence[KVCacheEvent]) -> Any:
        for indexer in self.indexers:
            indexer.apply_events(worker_id, events)

    def find_matches(self, block_hashes: Sequence[int]) -> PrefixMatches:
        return self.indexers[0].find_matches(block_hashes)


class MultiRouterReplay(OfflineReplay):
    """``OfflineReplay`` with N routers (kv policy), each request routed by one at random."""

    def __init__(self, requests: Sequence[TraceRequest], prompts: PromptBuilder,
                 config: ReplayConfig, num_routers: int,
                 profile: TimingProfile | None = None) -> None:  # fmt: skip
        super().__init__(requests, prompts, "kv", config, profile)
        bs = config.block_size
        self._rng = random.Random(config.seed)
        loads = [WorkerLoad(bs) for _ in range(num_routers)]
        indexers = [KVIndexer(bs) for _ in range(num_routers)]
        self.load = _LoadByOwner(loads)
        self.indexer = _IndexFanout(indexers)
        for worker_id in self.worker_ids:
            self.indexer.add_worker(worker_id)
        self._policies: list[RoutingPolicy] = []
        for load, indexer in zip(loads, indexers, strict=True):
            self._policies.append(self._make_router_policy(load, indexer))

    def _make_router_policy(self, load: WorkerLoad, indexer: KVIndexer) -> RoutingPolicy:
        outer_load, outer_indexer = self.load, self.indexer
        self.load, self.indexer = load, indexer  # _make_policy reads them
        try:
            return self._make_policy()
        finally:
            self.load, self.indexer = outer_load, outer_indexer

    def _on_arrival(self, r: TraceRequest) -> None:
        owner = self._rng.randrange(len(self._policies))
        assert isinstance(self.load, _LoadByOwner)
        self.load.owner = owner
        self.policy = self._policies[owner]
        super()._on_arrival(r)


def run(config: ReplayConfig, processes: list[int]) -> dict[str, Any]:
    requests = load_requests(config)
    profile = TimingProfile.from_json(config.timing_profile) if config.timing_profile else None
    prompts = PromptBuilder(config.block_size, config.vocab_size, config.seed)
    rows: dict[str, Any] = {}
    for n in processes:
        result: PolicyResult = MultiRouterReplay(requests, prompts, config, n, profile).run()
        rows[str(n)] = result.to_dict()
    base = rows[str(processes[0])]["hit_rate"]
    for row in rows.values():
        row["hit_rate_vs_first"] = round(row["hit_rate"] / base, 4) if base else None
    return {"trace": str(config.trace), "workers": config.workers, "limit": config.limit,
            "speedup": config.speedup, "processes": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL")
    parser.add_argument("--processes", default="1,2,4", help="router counts; the first is the base")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/frontend_routers.json"))
    args = parser.parse_args()
    config = ReplayConfig(trace=args.trace, workers=args.workers, limit=args.limit,
                          speedup=args.speedup, seed=args.seed)  # fmt: skip
    report = run(config, [int(n) for n in args.processes.split(",")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{'processes':>9s} {'hit rate':>9s} {'vs first':>9s} {'TTFT p50 ms':>12s} "
          f"{'TTFT p99 ms':>12s}")  # fmt: skip
    for n, row in report["processes"].items():
        ttft = row["ttft_s"]
        print(f"{n:>9s} {row['hit_rate']:9.4f} {row['hit_rate_vs_first']:9.4f} "
              f"{1000 * ttft['p50']:12.1f} {1000 * ttft['p99']:12.1f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
