"""KV tiers in the offline replay: a ``TierStack`` behind every engine, copies in virtual time.

``bench.replay.OfflineReplay`` gives each engine a stack (``serving/kvcache/stack.py``, the
worker's own code) with a G2 of ``kv_host_blocks_per_worker`` blocks and, with
``kv_s3_blocks``, a G4 whose index is one object shared by every engine: a block one worker
wrote to S3 is findable by all of them at once (the worker finds it at its next listing).
``TierFlow`` plays the ``KVTierManager``'s part without bytes:

* store jobs (write-through to G2, copies down to G4) finish when the step that planned them
  ends: they run beside the engine and delay no request (their bandwidth is not modelled);
* an onboard lands after the time the cost model gives for its blocks (per tier: latency per
  round of ``concurrency`` reads plus bytes over bandwidth), counted from the end of the step
  that planned it; the request waits, as in the worker, and its engine steps on meanwhile.

The cost check runs as in the worker, with the replay's bandwidths and the timing profile's
prefill speed, so its estimate is the modelled time exactly. Concurrent onboards on one worker
do not share bandwidth. See ``docs/replay.md`` and ``docs/kv-tiers.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.engine.core import EngineCore
from serving.engine.kv_offload import KVOnboard
from serving.engine.timing import TimingProfile
from serving.kvcache.policy import CostModel
from serving.kvcache.stack import DropJob, OnboardResult, StoreJob, TierIndex, TierStack

if TYPE_CHECKING:  # types only: bench.replay imports this module
    from bench.replay import ReplayConfig

# Llama-3-8B in bfloat16: 32 layers x 2 (K, V) x 8 KV heads x 128 x 2 bytes.
DEFAULT_KV_BYTES_PER_TOKEN = 131_072
# Tokens at which the timing profile's prefill speed is read for the cost check.
_PREFILL_PROBE_TOKENS = 8192


@dataclass
class TierFigures:
    """Counters over every engine's stack (``TierStats`` added up)."""

    hit_blocks: Counter[str] = field(default_factory=Counter)
    onboarded_blocks: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    stored_blocks: Counter[str] = field(default_factory=Counter)
    evicted_blocks: Counter[str] = field(default_factory=Counter)
    skipped_stores: Counter[str] = field(default_factory=Counter)
    onboard_s: list[float] = field(default_factory=list)


class TierFlow:
    """Owns the engines' tier stacks (and the shared G4 index); completes their copies."""

    def __init__(
        self,
        config: ReplayConfig,
        profile: TimingProfile,
        push: Callable[[float, KVOnboard, int], None],
    ) -> None:
        self.config = config
        self.block_bytes = config.kv_bytes_per_token * config.block_size
        probe = _PREFILL_PROBE_TOKENS
        self.prefill_tokens_per_s = probe / (profile.prefill_ms(probe) / 1e3)
        self.shared_g4 = (
            TierIndex("G4", config.kv_s3_blocks, shared=True) if config.kv_s3_blocks else None
        )
        self._push = push  # schedules (time_s, onboard, worker) -> on_onboard_done
        self.stacks: list[TierStack] = []
        self.figures = TierFigures()

    @property
    def enabled(self) -> bool:
        return bool(self.config.kv_host_blocks_per_worker or self.config.kv_s3_blocks)

    def cost_model(self) -> CostModel:
        c = self.config
        return CostModel.make(
            c.block_size,
            self.block_bytes,
            bandwidths={"G2": c.kv_host_bandwidth_gbps * 1e9, "G4": c.kv_s3_bandwidth_gbps * 1e9},
            latencies={"G4": c.kv_s3_latency_s},
            prefill_tokens_per_s=self.prefill_tokens_per_s,
        )

    def attach(self, engine: EngineCore) -> None:
        tiers: list[TierIndex] = []
        if self.config.kv_host_blocks_per_worker:
            tiers.append(TierIndex("G2", self.config.kv_host_blocks_per_worker))
        if self.shared_g4 is not None:
            tiers.append(self.shared_g4)
        stack = TierStack(tiers, self.cost_model(), min_uses=self.config.kv_offload_min_uses)
        engine.attach_tiers(stack)
        self.stacks.append(stack)

    # -- the simulator's hooks -----------------------------------------------------------------

    def start_onboards(self, worker: int, onboards: Sequence[KVOnboard], start_s: float) -> None:
        """Onboards planned by a step: each lands after its modelled copy time."""
        cost = self.stacks[worker].cost
        for onboard in onboards:
            counts = Counter(onboard.tiers)
            duration_s = cost.onboard_s(counts)
            self.figures.onboard_s.append(duration_s)
            self._push(start_s + duration_s, onboard, worker)

    def on_onboard_done(self, engine: EngineCore, onboard: KVOnboard) -> None:
        counts = Counter(onboard.tiers)
        result = OnboardResult(
            onboard.request_id,
            len(onboard.block_hashes),
            num_bytes_by_tier=tuple((t, n * self.block_bytes) for t, n in counts.items()),
        )
        engine.finish_kv_onboard(onboard, result)

    def finish_stores(self, engine: EngineCore, jobs: Sequence[Any]) -> None:
        """The step that planned ``jobs`` ended: they succeed, and so do the copies down they
        lead to (a store may make a block due for the next tier)."""
        pending = list(jobs)
        while pending:
            for job in pending:
                if isinstance(job, StoreJob):
                    engine.finish_tier_job(job.job_id, succeeded=True)
                else:
                    assert isinstance(job, DropJob)  # checks never fail here
            pending = engine.take_tier_jobs()

    def to_dict(self) -> dict[str, Any]:
        f = self.figures
        for stack in self.stacks:
            stats = stack.take_stats()
            f.hit_blocks.update(stats.hit_blocks)
            f.onboarded_blocks.update(stats.onboarded_blocks)
            f.decisions.update(stats.decisions)
            f.stored_blocks.update(stats.stored_blocks)
            f.evicted_blocks.update(stats.evicted_blocks)
            f.skipped_stores.update(stats.skipped_stores)
        bs = self.config.block_size
        onboard_s = sorted(f.onboard_s)
        return {
            "kv_tiers": {
                "onboarded_tokens": {t: n * bs for t, n in sorted(f.onboarded_blocks.items())},
                "hit_blocks": dict(sorted(f.hit_blocks.items())),
                "cost_check": dict(f.decisions),
                "stored_blocks": dict(sorted(f.stored_blocks.items())),
                "evicted_blocks": dict(sorted(f.evicted_blocks.items())),
                "skipped_stores": dict(sorted(f.skipped_stores.items())),
                "onboards": len(onboard_s),
                "onboard_s_p50": onboard_s[len(onboard_s) // 2] if onboard_s else None,
                "block_bytes": self.block_bytes,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
            }
        }


# -- the comparison (acceptance 6 of issue 16) ---------------------------------------------------


def compare(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Replay the trace with the kv router on G1 alone, + G2 per worker, + a shared G4 (at each
    ``--s3-gbps``): hit rate, TTFT and the tiers' work, with ratios to G1 alone, one process.

        python -m bench.replay_tiers --trace conversation_trace.jsonl

    (Mooncake's conversation trace: kvcache-ai/Mooncake, ``FAST25-release/traces/``.)
    """
    from bench.replay import ReplayConfig, run_offline

    args = _parse_args(argv)
    base = {
        "trace": args.trace,
        "workers": args.workers,
        "routers": ("kv",),
        "kv_blocks_per_worker": args.kv_blocks_per_worker,
        "limit": args.limit,
    }
    host = {"kv_host_blocks_per_worker": args.host_blocks}
    variants: list[tuple[str, dict[str, Any]]] = [("G1", {}), ("G1+G2", host)]
    for gbps in args.s3_gbps:
        s3 = {"kv_s3_blocks": args.s3_blocks, "kv_s3_bandwidth_gbps": gbps}
        variants.append((f"G1+G2+G4 ({gbps:g} GB/s)", {**host, **s3}))
    rows: dict[str, Any] = {}
    for name, extra in variants:
        started_s = time.perf_counter()
        report = run_offline(ReplayConfig(**base, **extra))
        figures = report["policies"]["kv"]
        rows[name] = {
            "hit_rate": figures["hit_rate"],
            "shared_bound_capacity_blocks": report["shared_cache"]["capacity_blocks"],
            "shared_bound_hit_rate": report["shared_cache"]["hit_rate"],
            "ttft_s": figures["ttft_s"],
            "completed": figures["requests"]["completed"],
            "kv_tiers": figures.get("kv_tiers"),
            "sim_wall_s": time.perf_counter() - started_s,
        }
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    first = rows["G1"]
    for row in rows.values():
        row["ttft_p50_ratio_to_g1"] = row["ttft_s"]["p50"] / first["ttft_s"]["p50"]
        row["ttft_p99_ratio_to_g1"] = row["ttft_s"]["p99"] / first["ttft_s"]["p99"]
    payload = {"config": {k: str(v) for k, v in vars(args).items()}, "variants": rows}
    _print_table(payload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return payload


def _print_table(payload: dict[str, Any]) -> None:
    print(
        "\n| tiers | hit rate | shared cache of the same capacity | TTFT p50 ms | TTFT p99 ms "
        "| TTFT p50 / G1 | tokens onboarded G2 / G4 | cost check onboard / recompute |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in payload["variants"].items():
        tiers = r["kv_tiers"] or {}
        onboarded = tiers.get("onboarded_tokens", {})
        check = tiers.get("cost_check", {})
        print(
            f"| {name} | {r['hit_rate']:.1%} | {r['shared_bound_hit_rate']:.1%} "
            f"({r['shared_bound_capacity_blocks']:,} blocks) | {r['ttft_s']['p50'] * 1e3:.0f} | "
            f"{r['ttft_s']['p99'] * 1e3:.0f} | {r['ttft_p50_ratio_to_g1']:.2f} | "
            f"{onboarded.get('G2', 0):,} / {onboarded.get('G4', 0):,} | "
            f"{check.get('onboard', 0):,} / {check.get('recompute', 0):,} |"
        )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=compare.__doc__.split("\n\n")[0])
    p.add_argument(
        "--trace",
        type=Path,
        required=True,
        help="a Mooncake-format trace (JSONL), e.g. its conversation trace",
    )
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--kv-blocks-per-worker", type=int, default=1024)
    p.add_argument("--host-blocks", type=int, default=4096, help="G2 blocks per worker.")
    p.add_argument("--s3-blocks", type=int, default=1_000_000, help="Shared G4 blocks.")
    p.add_argument(
        "--s3-gbps",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[2.0, 10.0],
        help="G4 bandwidths to compare (GB/s per worker), comma-separated.",
    )
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/replay-tiers.json"))
    return p.parse_args(argv)


if __name__ == "__main__":
    compare()
