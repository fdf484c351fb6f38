"""The replay report: its head (config, trace figures, the shared-cache upper bound) and the
rich table ``print_report`` shows, a column per policy and a row per figure."""

from __future__ import annotations

import math
import os
import platform
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.replay_config import ReplayConfig
from bench.trace import TraceRequest, check_hash_coverage

# -- the shared-cache upper bound ----------------------------------------------------------------


def shared_cache_hit_rate(
    requests: Sequence[TraceRequest], block_size: int, capacity_blocks: int | None
) -> float:
    """Prefix hit rate of one LRU block cache serving every request in arrival order.

    The bound the routers are measured against: all workers' blocks pooled into one cache
    (``capacity_blocks``; ``None`` = unbounded). Each request hits the leading run of its
    blocks already cached, capped as the engine caps it (at most ``(input_length - 1) //
    block_size`` blocks: one token is always computed), then its full prompt blocks become the
    most recently used, prefix last, so the prefix is evicted last (as the engine frees
    tail-first). Blocks are keyed by the chain of hash ids up to them, so two equal ids behind
    different prefixes are different blocks. No timing: requests never overlap, output blocks
    and in-flight requests take no room, which only favours the shared cache.
    """
    chain_ids: dict[tuple[int, int], int] = {}
    lru: OrderedDict[int, None] = OrderedDict()
    hit_tokens = 0
    prompt_tokens = 0
    for r in requests:
        num_full = min(r.input_length // block_size, len(r.hash_ids))
        max_hit = min((r.input_length - 1) // block_size, num_full)
        keys: list[int] = []
        parent = -1
        for hash_id in r.hash_ids[:num_full]:
            parent = chain_ids.setdefault((parent, hash_id), len(chain_ids))
            keys.append(parent)
        hits = 0
        while hits < max_hit and keys[hits] in lru:
            hits += 1
        hit_tokens += hits * block_size
        prompt_tokens += r.input_length
        for key in reversed(keys):
            lru[key] = None
            lru.move_to_end(key)
        if capacity_blocks is not None:
            while len(lru) > capacity_blocks:
                lru.popitem(last=False)
    return hit_tokens / prompt_tokens if prompt_tokens else 0.0


# -- the report ------------------------------------------------------------------------------------


def report_head(
    config: ReplayConfig, requests: Sequence[TraceRequest]
) -> tuple[dict[str, Any], float]:
    """The report without policies: config, trace figures and the shared-cache bound."""
    started = time.perf_counter()
    capacity = config.num_engines * config.kv_blocks_per_worker
    if config.has_tiers:  # the bound holds every tier's blocks
        capacity += config.num_engines * config.kv_host_blocks_per_worker + config.kv_s3_blocks
    shared = shared_cache_hit_rate(requests, config.block_size, capacity)
    unbounded = shared_cache_hit_rate(requests, config.block_size, None)
    span_s = (requests[-1].arrival_s - requests[0].arrival_s) if requests else 0.0
    report: dict[str, Any] = {
        "config": config.model_dump(mode="json", exclude={"out"}),
        "trace": {
            "requests": len(requests),
            "prompt_tokens": sum(r.input_length for r in requests),
            "output_tokens": sum(r.output_length for r in requests),
            "arrival_span_s": span_s / config.speedup,
            "hash_coverage_mismatches": check_hash_coverage(requests, config.block_size),
        },
        "shared_cache": {
            "capacity_blocks": capacity,
            "hit_rate": shared,
            "unbounded_hit_rate": unbounded,
            "model": "one LRU over hash-id chains, arrival order, no timing",
        },
        "policies": {},
        "runtime": {
            "shared_cache_s": time.perf_counter() - started,
            "policies_s": {},
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
            f"python {platform.python_version()}",
        },
    }
    return report, shared


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The report as one rich table: a column per policy, a row per figure."""
    console = console or Console()
    cfg, shared, policies = report["config"], report["shared_cache"], report["policies"]
    workers = f"{cfg['workers']} workers"
    if cfg.get("prefill_workers") or cfg.get("decode_workers"):
        workers = (
            f"{cfg['workers']} aggregated + {cfg['prefill_workers']} prefill + "
            f"{cfg['decode_workers']} decode workers (KV link {cfg['kv_bandwidth_gbps']:g} GB/s)"
        )
    table = Table(
        title=(
            f"{Path(cfg['trace']).name}: {report['trace']['requests']} requests, "
            f"{workers} x {cfg['kv_blocks_per_worker']} KV blocks of "
            f"{cfg['block_size']} tokens, speedup {cfg['speedup']:g}, {cfg['mode']}"
        ),
        caption=(
            f"shared-cache bound (one LRU of {shared['capacity_blocks']} blocks): "
            f"{shared['hit_rate']:.1%}; unbounded cache: {shared['unbounded_hit_rate']:.1%}"
        ),
    )
    table.add_column("")
    for name in policies:
        table.add_column(name, justify="right")
    rows = _ROWS
    if any("disagg_decisions" in res for res in policies.values()):
        rows = _ROWS + _DISAGG_ROWS
    if any("kv_tiers" in res for res in policies.values()):
        rows = rows + _TIER_ROWS
    for label, cell in rows:
        table.add_row(label, *(cell(res) for res in policies.values()))
    console.print(table)
    wall = report["runtime"]["policies_s"]
    console.print(
        "simulated in " + ", ".join(f"{name} {s:.0f} s" for name, s in wall.items()),
        style="dim",
    )


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 1e3:.1f}" if value < 1 else f"{value * 1e3:.0f}"


def _cell(fmt: str, *path: str) -> Callable[[dict[str, Any]], str]:
    """Format ``r[path[0]][path[1]]...`` with ``fmt``; "-" where the figure is absent."""

    def cell(r: dict[str, Any]) -> str:
        value: Any = r
        for key in path:
            if not isinstance(value, dict) or value.get(key) is None:
                return "-"
            value = value[key]
        return _ms(value) if fmt == "ms" else format(value, fmt)

    return cell


_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("prefix hit rate", _cell(".1%", "hit_rate")),
    ("  of shared-cache bound", _cell(".0%", "hit_rate_of_shared_bound")),
    ("  router-predicted", _cell(".1%", "router_predicted_hit_rate")),
    ("TTFT p50 ms", _cell("ms", "ttft_s", "p50")),
    ("TTFT p90 ms", _cell("ms", "ttft_s", "p90")),
    ("TTFT p99 ms", _cell("ms", "ttft_s", "p99")),
    ("ITL p50 ms", _cell("ms", "itl_s", "p50")),
    ("ITL p99 ms", _cell("ms", "itl_s", "p99")),
    ("throughput out tok/s", _cell(".0f", "throughput_tok_s")),
    ("engine busy fraction", _cell(".2f", "busy_fraction")),
    ("prompt tokens max/mean", _cell(".2f", "imbalance", "prompt_tokens_max_over_mean")),
    ("prompt tokens CV", _cell(".3f", "imbalance", "prompt_tokens_cv")),
    ("busy time max/mean", _cell(".2f", "imbalance", "busy_s_max_over_mean")),
    ("completed", _cell("d", "requests", "completed")),
    ("rejected / failed", _cell("d", "requests", "rejected")),
    ("preemptions", _cell("d", "num_preemptions")),
]


def _decisions_cell(r: dict[str, Any]) -> str:
    decisions = r.get("disagg_decisions") or {}
    return ", ".join(f"{name} {count}" for name, count in decisions.items()) or "-"


_DISAGG_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("prefill decisions", _decisions_cell),
    ("TTFT remote p50 ms", _cell("ms", "ttft_s_by_decision", "remote", "p50")),
    ("TTFT remote p99 ms", _cell("ms", "ttft_s_by_decision", "remote", "p99")),
    ("KV pulls", _cell("d", "kv_transfer", "pulls")),
    ("KV pulled GB", lambda r: f"{r['kv_transfer']['bytes'] / 1e9:.2f}"),
    ("KV pull p50 ms", _cell("ms", "kv_transfer", "time_s", "p50")),
    ("KV pull p99 ms", _cell("ms", "kv_transfer", "time_s", "p99")),
    ("KV pulls failed", _cell("d", "kv_transfer", "failed")),
    (
        "leases expired / at end",
        lambda r: f"{r['leases_expired']} / {r['leases_outstanding_at_end']}",
    ),
]

_TIER_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("tokens onboarded from G2", _cell("d", "kv_tiers", "onboarded_tokens", "G2")),
    ("tokens onboarded from G4", _cell("d", "kv_tiers", "onboarded_tokens", "G4")),
    ("cost check: onboard", _cell("d", "kv_tiers", "cost_check", "onboard")),
    ("cost check: recompute", _cell("d", "kv_tiers", "cost_check", "recompute")),
    ("onboard p50 ms", _cell("ms", "kv_tiers", "onboard_s_p50")),
]
