"""``strata bench replay``: typer options -> ``ReplayConfig`` (validated once) -> the replay.

The benchmarks live in the repository's ``bench/`` directory, which is not an installed package:
the commands import it from the checkout this module belongs to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from serving.router.policies import DEFAULT_PREFILL_SCALE

REPO_ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(no_args_is_help=True)


def _opt(*names: str, help: str, env: str) -> object:
    return typer.Option(*names, help=help, envvar=f"STRATA_BENCH_{env}", show_envvar=True)


@app.callback()
def bench_commands() -> None:
    """Benchmarks: replay request traces through the router and engines; load a live endpoint."""


@app.command()
def replay(
    trace: Annotated[Path, _opt("--trace", help="Mooncake-format JSONL trace.", env="TRACE")],
    workers: Annotated[
        int | None,
        _opt(
            "--workers",
            help="Aggregated engines (prefill + decode); default 8, 0 with --prefill/--decode.",
            env="WORKERS",
        ),
    ] = None,
    prefill: Annotated[
        int,
        _opt("--prefill", help="Prefill-only engines (disaggregated, offline).", env="PREFILL"),
    ] = 0,
    decode: Annotated[
        int,
        _opt("--decode", help="Decode-only engines (disaggregated, offline).", env="DECODE"),
    ] = 0,
    kv_bandwidth_gbps: Annotated[
        float,
        _opt(
            "--kv-bandwidth-gbps",
            help="Disaggregated: KV pull bandwidth, GB/s; a pull takes tokens * 128 KiB / this.",
            env="KV_BANDWIDTH_GBPS",
        ),
    ] = 25.0,
    max_local_prefill_tokens: Annotated[
        int,
        _opt(
            "--max-local-prefill-tokens",
            help="Disaggregated: the decode engine prefills itself when the uncached part of the "
            "prompt is under this many tokens (and under --max-local-prefill-fraction of it).",
            env="MAX_LOCAL_PREFILL_TOKENS",
        ),
    ] = 2048,
    max_local_prefill_fraction: Annotated[
        float,
        _opt(
            "--max-local-prefill-fraction",
            help="Disaggregated: ... and under this share of the prompt.",
            env="MAX_LOCAL_PREFILL_FRACTION",
        ),
    ] = 0.7,
    router: Annotated[
        list[str],
        _opt(
            "--router",
            help="Routing policy: kv, approx, round-robin, random, least-loaded, session. "
            "Repeat (or comma-separate) to compare several on the same trace.",
            env="ROUTER",
        ),
    ] = ["kv"],  # noqa: B006 (typer reads the default, never mutates it)
    engine: Annotated[str, _opt("--engine", help="Engine behind each worker.", env="ENGINE")] = (
        "mock"
    ),
    kv_blocks_per_worker: Annotated[
        int, _opt("--kv-blocks-per-worker", help="KV blocks per engine.", env="KV_BLOCKS")
    ] = 1024,
    block_size: Annotated[
        int, _opt("--block-size", help="Tokens per trace hash id and KV block.", env="BLOCK_SIZE")
    ] = 512,
    kv_host_blocks_per_worker: Annotated[
        int,
        _opt(
            "--kv-host-blocks-per-worker",
            help="KV tiers: G2 (host memory) blocks behind each engine; 0: none.",
            env="KV_HOST_BLOCKS",
        ),
    ] = 0,
    kv_s3_blocks: Annotated[
        int,
        _opt(
            "--kv-s3-blocks",
            help="KV tiers: blocks of one G4 (S3) tier shared by every engine; 0: none.",
            env="KV_S3_BLOCKS",
        ),
    ] = 0,
    kv_s3_bandwidth_gbps: Annotated[
        float,
        _opt("--kv-s3-bandwidth-gbps", help="KV tiers: G4 -> device GB/s.", env="KV_S3_GBPS"),
    ] = 2.0,
    mode: Annotated[
        str, _opt("--mode", help="offline (virtual time) | online (HTTP).", env="MODE")
    ] = "offline",
    speedup: Annotated[
        float, _opt("--speedup", help="Divide trace arrival times by this.", env="SPEEDUP")
    ] = 1.0,
    limit: Annotated[
        int | None, _opt("--limit", help="Replay only the first K requests.", env="LIMIT")
    ] = None,
    arrival_jitter_s: Annotated[
        float | None,
        _opt(
            "--arrival-jitter-s",
            help="Spread each arrival uniformly over this many trace seconds (default 0; "
            "--planner: 3, the Mooncake trace's bucket).",
            env="ARRIVAL_JITTER_S",
        ),
    ] = None,
    kv_prefill_scale: Annotated[
        float,
        _opt(
            "--kv-prefill-scale",
            help="kv/approx cost: weight of each uncached prompt block against active KV blocks.",
            env="KV_PREFILL_SCALE",
        ),
    ] = DEFAULT_PREFILL_SCALE,
    seed: Annotated[int, _opt("--seed", help="Tokens, policies, jitter.", env="SEED")] = 0,
    max_num_seqs: Annotated[
        int, _opt("--max-num-seqs", help="Per engine.", env="MAX_NUM_SEQS")
    ] = 64,
    max_num_batched_tokens: Annotated[
        int,
        _opt("--max-num-batched-tokens", help="Per engine step.", env="MAX_NUM_BATCHED_TOKENS"),
    ] = 8192,
    timing_profile: Annotated[
        Path | None,
        _opt("--timing-profile", help="Mock engine timing profile (JSON).", env="PROFILE"),
    ] = None,
    url: Annotated[
        str | None, _opt("--url", help="Online mode: OpenAI base URL.", env="URL")
    ] = None,
    planner: Annotated[
        list[str] | None,
        _opt(
            "--planner",
            help="Instead of routers: a day of the trace (diurnal cycle, --speedup at the peak)"
            " under these pool sizings: static, reactive, lead-time (repeat or comma-separate);"
            " offline, the planner over the virtual connector. docs/planner.md.",
            env="PLANNER",
        ),
    ] = None,
    lead_time_s: Annotated[
        float,
        _opt("--lead-time-s", help="--planner: order to serving replica, s.", env="LEAD_TIME_S"),
    ] = 180.0,
    sla_ttft_s: Annotated[
        float, _opt("--sla-ttft-s", help="--planner: TTFT target, s.", env="SLA_TTFT_S")
    ] = 2.0,
    sla_itl_s: Annotated[
        float, _opt("--sla-itl-s", help="--planner: mean ITL target, s.", env="SLA_ITL_S")
    ] = 0.05,
    duration_s: Annotated[
        float,
        _opt("--duration-s", help="--planner: simulated time measured, s.", env="DURATION_S"),
    ] = 86_400.0,
    static_replicas: Annotated[
        int | None,
        _opt(
            "--static-replicas",
            help="--planner static: this many replicas (default: what the day's peak five "
            "minutes need by the planner's capacity model).",
            env="STATIC_REPLICAS",
        ),
    ] = None,
    planner_config: Annotated[
        Path | None,
        _opt(
            "--planner-config",
            help="--planner: planner YAML for the planned sizings (roles: both); the study "
            "sets the SLA, lead time and connector.",
            env="PLANNER_CONFIG",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        _opt("--out", help="JSON report (default: bench/results/replay-*.json).", env="OUT"),
    ] = None,
    model: Annotated[
        Path,
        typer.Option(help="Online mode without --url: checkpoint dir for `strata serve`."),
    ] = REPO_ROOT / ".strata" / "test-cache" / "smollm2-135m-instruct",
) -> None:
    """Replay a Mooncake trace; print hit rates, TTFT, ITL, throughput and load imbalance."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.load import LoadError
    from bench.replay import run_offline
    from bench.replay_config import ReplayConfig, default_out_path
    from bench.replay_online import run_online, run_online_managed
    from bench.replay_report import print_report

    if planner:
        options = {
            "trace": trace, "policies": _split(planner), "peak_speedup": speedup,
            "lead_time_s": lead_time_s, "sla_ttft_s": sla_ttft_s, "sla_itl_s": sla_itl_s,
            "duration_s": duration_s, "planner_config": planner_config, "seed": seed,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "kv_capacity_tokens": kv_blocks_per_worker * block_size,
            "timing_profile": timing_profile, "static_replicas": static_replicas,
        }  # fmt: skip
        if arrival_jitter_s is not None:
            options["arrival_jitter_s"] = arrival_jitter_s
        _planner_study(options, out)
        return
    routers = _split(router)
    if workers is None:
        workers = 0 if prefill or decode else 8
    try:
        config = ReplayConfig(
            trace=trace,
            workers=workers,
            prefill_workers=prefill,
            decode_workers=decode,
            kv_bandwidth_gbps=kv_bandwidth_gbps,
            max_local_prefill_tokens=max_local_prefill_tokens,
            max_local_prefill_fraction=max_local_prefill_fraction,
            routers=routers,
            engine=engine,
            mode=mode,
            kv_blocks_per_worker=kv_blocks_per_worker,
            kv_host_blocks_per_worker=kv_host_blocks_per_worker,
            kv_s3_blocks=kv_s3_blocks,
            kv_s3_bandwidth_gbps=kv_s3_bandwidth_gbps,
            block_size=block_size,
            speedup=speedup,
            limit=limit,
            arrival_jitter_s=arrival_jitter_s or 0.0,
            kv_prefill_scale=kv_prefill_scale,
            seed=seed,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            timing_profile=timing_profile,
            url=url,
            out=out,
        )
    except ValidationError as exc:
        raise typer.BadParameter(_describe(exc)) from None
    err = Console(stderr=True, soft_wrap=True)
    try:
        if config.mode == "offline":
            report = run_offline(config)
        elif config.url is not None:
            report = run_online(config)
        else:  # start `strata serve` with mock workers per policy
            if not (model / "config.json").is_file():
                raise ValueError(f"--model {model}: no config.json (the tokenizer for serve)")
            report = run_online_managed(config, model.absolute())
    except (OSError, ValueError, RuntimeError, LoadError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    print_report(report)
    path = config.out or default_out_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    Console().print(f"wrote {path}")


def _split(items: list[str]) -> tuple[str, ...]:
    return tuple(name.strip() for item in items for name in item.split(",") if name.strip())


def _planner_study(options: dict, out: Path | None) -> None:
    """``replay --planner``: the day study (``bench/planner_day.py``); table and JSON."""
    from bench.planner_day import DayStudyConfig, print_study, run_study

    try:
        config = DayStudyConfig(**options)
    except ValidationError as exc:
        raise typer.BadParameter(_describe(exc)) from None
    err = Console(stderr=True, soft_wrap=True)
    try:
        report = run_study(config, progress=lambda line: err.print(escape(line)))
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    print_study(report)
    path = out or REPO_ROOT / "bench" / "results" / f"planner-day-{config.trace.stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    Console().print(f"wrote {path}")


@app.command()
def serve(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="With --compare: run directories (each holds a run.json).", show_default=False
        ),
    ] = None,
    url: Annotated[
        str | None, _opt("--url", help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1.", env="URL")
    ] = None,
    out: Annotated[
        Path | None, _opt("--out", help="Directory for run.json, *.png, report.html.", env="OUT")
    ] = None,
    trace: Annotated[
        Path | None, _opt("--trace", help="Mooncake-format JSONL trace (open loop).", env="TRACE")
    ] = None,
    speedup: Annotated[
        float, _opt("--speedup", help="Trace: divide arrival times by this.", env="SPEEDUP")
    ] = 1.0,
    limit: Annotated[
        int | None, _opt("--limit", help="Trace: send only the first K requests.", env="LIMIT")
    ] = None,
    synthetic: Annotated[
        bool, _opt("--synthetic", help="Constant concurrency, fixed lengths.", env="SYNTHETIC")
    ] = False,
    concurrency: Annotated[
        int, _opt("--concurrency", help="Synthetic: requests in flight.", env="CONCURRENCY")
    ] = 8,
    num_requests: Annotated[
        int, _opt("--num-requests", help="Synthetic: requests in all.", env="NUM_REQUESTS")
    ] = 100,
    prompt_tokens: Annotated[
        int, _opt("--prompt-tokens", help="Synthetic: tokens per prompt.", env="PROMPT_TOKENS")
    ] = 256,
    output_tokens: Annotated[
        int, _opt("--output-tokens", help="Synthetic: max_tokens.", env="OUTPUT_TOKENS")
    ] = 64,
    block_size: Annotated[
        int, _opt("--block-size", help="Trace: tokens per hash id.", env="BLOCK_SIZE")
    ] = 512,
    vocab_size: Annotated[
        int, _opt("--vocab-size", help="Prompt token ids are below this.", env="VOCAB_SIZE")
    ] = 32_000,
    seed: Annotated[int, _opt("--seed", help="Prompt tokens.", env="SEED")] = 0,
    model_name: Annotated[
        str | None, _opt("--model", help="Model name (default: the first listed).", env="MODEL")
    ] = None,
    api_key: Annotated[
        str | None, _opt("--api-key", help="Bearer token (not written out).", env="API_KEY")
    ] = None,
    label: Annotated[
        str | None,
        _opt("--label", help="Run name in reports (default: --out's name).", env="LABEL"),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Compare the RUNS directories in one report.")
    ] = False,
) -> None:
    """Load an OpenAI endpoint (trace or constant concurrency); write run.json and a report."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.load import LoadError
    from bench.serve import ServeBenchConfig, run_serve_bench
    from bench.serve_report import print_summaries

    err = Console(stderr=True, soft_wrap=True)
    if out is None:
        raise typer.BadParameter("--out DIR is required")
    if compare:
        _compare_runs(runs or [], out, err)
        return
    if runs:
        raise typer.BadParameter(f"unexpected arguments {[str(r) for r in runs]} (--compare?)")
    if url is None:
        raise typer.BadParameter("--url is required (or --compare RUN RUN ...)")
    try:
        config = ServeBenchConfig(
            url=url, out=out, trace=trace, speedup=speedup, limit=limit, synthetic=synthetic,
            concurrency=concurrency, num_requests=num_requests, prompt_tokens=prompt_tokens,
            output_tokens=output_tokens, block_size=block_size, vocab_size=vocab_size,
            seed=seed, model=model_name, label=label, api_key=api_key,
        )  # fmt: skip
    except ValidationError as exc:
        raise typer.BadParameter(_describe(exc)) from None
    try:
        run = run_serve_bench(config)
    except (OSError, ValueError, LoadError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    print_summaries(f"strata bench serve: {config.url}", [run])
    Console().print(f"wrote {config.out / 'run.json'} and {config.out / 'report.html'}")


def _compare_runs(runs: list[Path], out: Path, err: Console) -> None:
    """``serve --compare``: one report over the runs' ``run.json`` files."""
    from bench.serve import read_run
    from bench.serve_report import print_summaries, write_compare_report

    if len(runs) < 2:
        raise typer.BadParameter("--compare needs two or more run directories")
    try:
        loaded = [read_run(path) for path in runs]
        path = write_compare_report(loaded, out)
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    print_summaries("strata bench serve --compare", loaded)
    Console().print(f"wrote {path}")


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )
