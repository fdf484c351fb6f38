"""Disaggregated prefill/decode in the offline simulator: 4 engines, three layouts, one workload.

    .venv/bin/python -m bench.disagg [--seed 0] [--duration 120 | --requests N] [--rate 12]
        [--long-fraction 0.15] [--router kv] [--kv-bandwidth-gbps 25] [--out PATH]

The workload mixes two kinds of requests, Poisson arrivals at ``--rate`` requests/s in all:

* **decode streams** (``1 - --long-fraction`` of them): 200-500 prompt tokens, 200-400 output
  tokens; they make up most of the decode batch and almost every inter-token gap;
* **long prompts** (``--long-fraction``): 6,000-12,000 prompt tokens (a document, a long
  conversation), 16-64 output tokens.

Prompts share nothing (every block has its own hash id), so nothing is found in a prefix cache.
Each layout replays the same requests in ``bench/replay.py``'s ``OfflineReplay`` (real router,
scheduler and KV cache; ``MockModelRunner``'s H100 / Llama-3-8B timing model; virtual time):

* ``aggregated 4``: four engines that prefill and decode;
* ``1P + 3D``: one prefill engine, three decode engines;
* ``2P + 2D``: two of each.

Engines are sized like an 80 GB H100 serving Llama-3-8B (32,768 KV blocks of 16 tokens =
64 GiB), with 8,192 batched tokens per step. Prints one table (ratios to the aggregated layout
of the same run) and writes ``bench/results/disagg-*.json``. See ``docs/replay.md``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, cpu_name, machine_info, print_table, write_json
from bench.replay import OfflineReplay, PolicyResult, ReplayConfig
from bench.trace import PromptBuilder, TraceRequest
from serving.router.policies import POLICY_NAMES

STREAM_PROMPT = (200, 500)
STREAM_OUTPUT = (200, 400)
LONG_PROMPT = (6_000, 12_000)
LONG_OUTPUT = (16, 64)
BLOCK_SIZE = 16
KV_BLOCKS_PER_WORKER = 32_768  # 524,288 tokens x 128 KiB = 64 GiB: an H100 after the weights
NUM_ENGINES = 4
# (name, aggregated, prefill, decode)
LAYOUTS: tuple[tuple[str, int, int, int], ...] = (
    ("aggregated 4", 4, 0, 0),
    ("1P + 3D", 0, 1, 3),
    ("2P + 2D", 0, 2, 2),
)


def make_workload(
    *,
    rate_per_s: float,
    long_fraction: float,
    duration_s: float | None = None,
    num_requests: int | None = None,
    system_prompt_tokens: int = 0,
    block_size: int = BLOCK_SIZE,
    seed: int = 0,
) -> tuple[list[TraceRequest], set[int]]:
    """Poisson arrivals of decode streams and long prompts; returns (requests, long indices).

    Stops after ``num_requests`` requests, or at the first arrival past ``duration_s``.
    Deterministic in ``seed``. Every prompt block gets a fresh hash id (no shared prefixes),
    except that streams may start with one shared system prompt of ``system_prompt_tokens``
    (rounded down to whole blocks), which their 200-500 tokens then follow.
    """
    if (duration_s is None) == (num_requests is None):
        raise ValueError("give exactly one of duration_s and num_requests")
    rng = random.Random(seed)
    requests: list[TraceRequest] = []
    long_indices: set[int] = set()
    t = 0.0
    system_blocks = system_prompt_tokens // block_size
    system_ids = tuple(range(system_blocks))
    next_id = system_blocks
    while True:
        if num_requests is not None and len(requests) >= num_requests:
            break
        if duration_s is not None and t > duration_s:
            break
        is_long = rng.random() < long_fraction
        prompt = rng.randint(*(LONG_PROMPT if is_long else STREAM_PROMPT))
        output = rng.randint(*(LONG_OUTPUT if is_long else STREAM_OUTPUT))
        prefix = () if is_long else system_ids
        num_blocks = -(-prompt // block_size)
        index = len(requests)
        if is_long:
            long_indices.add(index)
        hash_ids = (*prefix, *range(next_id, next_id + num_blocks))
        requests.append(TraceRequest(index, t, len(prefix) * block_size + prompt, output, hash_ids))
        next_id += num_blocks
        t += rng.expovariate(rate_per_s)
    return requests, long_indices


def run_layout(
    requests: Sequence[TraceRequest],
    config: ReplayConfig,
    router: str,
    long_indices: set[int],
) -> dict[str, Any]:
    """One layout's figures: the replay's report plus TTFT split by request kind."""
    prompts = PromptBuilder(config.block_size, config.vocab_size, config.seed)
    replay = OfflineReplay(requests, prompts, router, config)  # type: ignore[arg-type]
    result = replay.run()
    figures = result.to_dict()
    figures["ttft_s_long"] = _split_ttft(result, long_indices, long=True)
    figures["ttft_s_stream"] = _split_ttft(result, long_indices, long=False)
    # The tail where whole long-prompt chunks share a step with the decodes.
    if len(result.itl_samples_s):
        p999 = np.percentile(np.asarray(result.itl_samples_s), 99.9)
        figures["itl_s"] = {
            **figures["itl_s"],
            "p99.9": float(p999),
            "max": float(max(result.itl_samples_s)),
        }
    figures["sim_wall_s"] = result.sim_wall_s
    return figures


def _split_ttft(result: PolicyResult, long_indices: set[int], *, long: bool) -> dict[str, float]:
    values = [
        ttft for rid, ttft in result.request_ttft_s.items() if (int(rid) in long_indices) == long
    ]
    if not values:
        return {"p50": math.nan, "p99": math.nan}
    p50, p99 = np.percentile(np.asarray(values), (50, 99))
    return {"p50": float(p50), "p99": float(p99)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--duration", type=float, default=None, help="arrivals for this many s")
    size.add_argument("--requests", type=int, default=None, help="this many requests")
    parser.add_argument("--rate", type=float, default=12.0, help="requests/s, both kinds")
    parser.add_argument("--long-fraction", type=float, default=0.15)
    parser.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=0,
        help="a system prompt every stream starts with (cached: streams can prefill locally)",
    )
    parser.add_argument("--router", default="kv", choices=POLICY_NAMES)
    parser.add_argument("--kv-bandwidth-gbps", type=float, default=25.0)
    parser.add_argument("--max-local-prefill-tokens", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 120.0
    if args.rate <= 0 or not 0 <= args.long_fraction <= 1:
        parser.error("--rate must be > 0 and --long-fraction in [0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    requests, long_indices = make_workload(
        rate_per_s=args.rate,
        long_fraction=args.long_fraction,
        duration_s=args.duration,
        num_requests=args.requests,
        system_prompt_tokens=args.system_prompt_tokens,
        seed=args.seed,
    )
    workload = {
        "seed": args.seed,
        "rate_per_s": args.rate,
        "long_fraction": args.long_fraction,
        "system_prompt_tokens": args.system_prompt_tokens,
        "duration_s": args.duration,
        "requests": len(requests),
        "long_requests": len(long_indices),
        "arrival_span_s": requests[-1].arrival_s if requests else 0.0,
        "prompt_tokens": sum(r.input_length for r in requests),
        "output_tokens": sum(r.output_length for r in requests),
        "stream": {"prompt": STREAM_PROMPT, "output": STREAM_OUTPUT},
        "long": {"prompt": LONG_PROMPT, "output": LONG_OUTPUT},
    }
    layouts: dict[str, dict[str, Any]] = {}
    for name, aggregated, prefill, decode in LAYOUTS:
        config = ReplayConfig(
            trace=Path("synthetic:disagg"),
            workers=aggregated,
            prefill_workers=prefill,
            decode_workers=decode,
            routers=(args.router,),
            kv_blocks_per_worker=KV_BLOCKS_PER_WORKER,
            block_size=BLOCK_SIZE,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_bandwidth_gbps=args.kv_bandwidth_gbps,
            max_local_prefill_tokens=args.max_local_prefill_tokens,
            seed=args.seed,
        )
        print(f"simulating {name} ...", flush=True)
        figures = run_layout(requests, config, args.router, long_indices)
        layouts[name] = {"config": config.model_dump(mode="json", exclude={"out"}), **figures}
    payload = {"machine": machine_info(), "workload": workload, "layouts": layouts}
    report(payload, args)
    out = args.out or RESULTS_DIR / (
        f"disagg-{args.router}-r{args.rate:g}-l{args.long_fraction:g}"
        f"-sys{args.system_prompt_tokens}-s{args.seed}.json"
    )
    print(f"wrote {write_json(out, payload)}")
    return payload


# -- the table ---------------------------------------------------------------------------------

_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # (label, path into a layout's figures, kind); "ms" figures get a ratio to the baseline.
    ("ITL p50 ms", ("itl_s", "p50"), "ms"),
    ("ITL p99 ms", ("itl_s", "p99"), "ms"),
    ("ITL p99.9 ms", ("itl_s", "p99.9"), "ms"),
    ("ITL max ms", ("itl_s", "max"), "ms"),
    ("TTFT p50 ms (all)", ("ttft_s", "p50"), "ms"),
    ("TTFT p99 ms (all)", ("ttft_s", "p99"), "ms"),
    ("TTFT p50 ms (streams)", ("ttft_s_stream", "p50"), "ms"),
    ("TTFT p99 ms (streams)", ("ttft_s_stream", "p99"), "ms"),
    ("TTFT p50 ms (long prompts)", ("ttft_s_long", "p50"), "ms"),
    ("TTFT p99 ms (long prompts)", ("ttft_s_long", "p99"), "ms"),
    ("e2e p50 s", ("e2e_s", "p50"), "s"),
    ("output tok/s", ("throughput_tok_s",), "rate"),
    ("engine busy fraction", ("busy_fraction",), "frac"),
    ("completed", ("requests", "completed"), "int"),
    ("preemptions", ("num_preemptions",), "int"),
)


def _get(figures: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def _format(value: Any, kind: str, base: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return str(value)
    if kind == "frac":
        return f"{value:.2f}"
    if kind == "s":
        text = f"{value:.2f}"
    elif kind == "rate":
        text = f"{value:,.0f}"
    else:
        ms = value * 1e3
        text = f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"
    if base is None or base is value or not base:
        return text
    return f"{text} ({value / base:.2f}x)"


def report(payload: dict[str, Any], args: argparse.Namespace) -> None:
    layouts = payload["layouts"]
    names = list(layouts)
    baseline = layouts[names[0]]
    rows: list[list[str]] = []
    for label, path, kind in _ROWS:
        base = _get(baseline, path)
        rows.append([label, *(_format(_get(layouts[n], path), kind, base) for n in names)])
    rows.append(["prefill decisions", *(_decisions(layouts[n]) for n in names)])
    rows.append(["KV pulled GB", *(_pulled(layouts[n], "gb") for n in names)])
    rows.append(["KV pull p50 / p99 ms", *(_pulled(layouts[n], "ms") for n in names)])
    rows.append(["leases at end", *(_leases(layouts[n]) for n in names)])
    rows.append(["simulated in s", *(f"{layouts[n]['sim_wall_s']:.0f}" for n in names)])
    w = payload["workload"]
    sys_prompt = (
        f", streams after a {w['system_prompt_tokens']}-token system prompt"
        if w["system_prompt_tokens"]
        else ""
    )
    print_table(
        f"{w['requests']} requests over {w['arrival_span_s']:.0f} s ({w['long_requests']} long "
        f"prompts{sys_prompt}), {args.rate:g} req/s, router {args.router}, KV link "
        f"{args.kv_bandwidth_gbps:g} GB/s, {NUM_ENGINES} engines; offline simulator on "
        f"{cpu_name()}",
        ["", *names],
        rows,
    )


def _decisions(figures: dict[str, Any]) -> str:
    decisions = figures.get("disagg_decisions")
    if decisions is None:
        return "aggregated"
    return ", ".join(f"{name} {count}" for name, count in decisions.items())


def _pulled(figures: dict[str, Any], what: str) -> str:
    transfer = figures.get("kv_transfer")
    if transfer is None:
        return "-"
    if what == "gb":
        return f"{transfer['bytes'] / 1e9:,.1f}"
    times = transfer["time_s"]
    if math.isnan(times["p50"]):
        return "-"
    return f"{times['p50'] * 1e3:.1f} / {times['p99'] * 1e3:.1f}"


def _leases(figures: dict[str, Any]) -> str:
    if "leases_outstanding_at_end" not in figures:
        return "-"
    return str(figures["leases_outstanding_at_end"])


if __name__ == "__main__":
    main()
