"""``strata bench``: typer options (``workflows.bench_options``) -> a config, validated once.

The benchmarks live in the repository's ``bench/`` directory, which is not an installed package:
the commands import it from the checkout this module belongs to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from serving.router.policies import DEFAULT_PREFILL_SCALE
from workflows import bench_options as opts

if TYPE_CHECKING:  # bench/ is imported from the checkout at run time (below)
    from bench.replay_config import ReplayConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(no_args_is_help=True)


@app.callback()
def bench_commands() -> None:
    """Benchmarks: replay request traces through the router and engines; load a live endpoint."""


@app.command()
def replay(
    trace: opts.TraceOpt,
    workers: opts.WorkersOpt = None,
    prefill: opts.PrefillOpt = 0,
    decode: opts.DecodeOpt = 0,
    kv_bandwidth_gbps: opts.KvBandwidthGbpsOpt = 25.0,
    max_local_prefill_tokens: opts.MaxLocalPrefillTokensOpt = 2048,
    max_local_prefill_fraction: opts.MaxLocalPrefillFractionOpt = 0.7,
    router: opts.RouterOpt = ["kv"],  # noqa: B006 (typer reads the default, never mutates it)
    engine: opts.EngineOpt = "mock",
    kv_blocks_per_worker: opts.KvBlocksPerWorkerOpt = 1024,
    block_size: opts.BlockSizeOpt = 512,
    kv_host_blocks_per_worker: opts.KvHostBlocksPerWorkerOpt = 0,
    kv_s3_blocks: opts.KvS3BlocksOpt = 0,
    kv_s3_bandwidth_gbps: opts.KvS3BandwidthGbpsOpt = 2.0,
    mode: opts.ModeOpt = "offline",
    speedup: opts.SpeedupOpt = 1.0,
    limit: opts.LimitOpt = None,
    arrival_jitter_s: opts.ArrivalJitterSOpt = None,
    kv_prefill_scale: opts.KvPrefillScaleOpt = DEFAULT_PREFILL_SCALE,
    seed: opts.SeedOpt = 0,
    max_num_seqs: opts.MaxNumSeqsOpt = 64,
    max_num_batched_tokens: opts.MaxNumBatchedTokensOpt = 8192,
    timing_profile: opts.TimingProfileOpt = None,
    url: opts.UrlOpt = None,
    planner: opts.PlannerOpt = None,
    lead_time_s: opts.LeadTimeSOpt = 180.0,
    sla_ttft_s: opts.SlaTtftSOpt = 2.0,
    sla_itl_s: opts.SlaItlSOpt = 0.05,
    duration_s: opts.DurationSOpt = 86_400.0,
    daily_curve: opts.DailyCurveOpt = "chat",
    static_replicas: opts.StaticReplicasOpt = None,
    planner_config: opts.PlannerConfigOpt = None,
    out: opts.OutOpt = None,
    model: opts.OnlineModelOpt = REPO_ROOT / ".strata" / "test-cache" / "smollm2-135m-instruct",
) -> None:
    """Replay a Mooncake trace; print hit rates, TTFT, ITL, throughput and load imbalance."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.replay_config import ReplayConfig

    if planner:
        options = {
            "trace": trace, "policies": _split(planner), "peak_speedup": speedup,
            "lead_time_s": lead_time_s, "sla_ttft_s": sla_ttft_s, "sla_itl_s": sla_itl_s,
            "duration_s": duration_s, "planner_config": planner_config, "seed": seed,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "kv_capacity_tokens": kv_blocks_per_worker * block_size,
            "timing_profile": timing_profile, "static_replicas": static_replicas,
            "daily_curve": daily_curve,
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
    _run_replay(config, model)


def _run_replay(config: ReplayConfig, model: Path) -> None:
    """Run the replay; print the table and write the JSON report."""
    from bench.load import LoadError
    from bench.replay import run_offline
    from bench.replay_config import default_out_path
    from bench.replay_online import run_online, run_online_managed
    from bench.replay_report import print_report

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
    runs: opts.ServeRunsOpt = None,
    url: opts.ServeUrlOpt = None,
    out: opts.ServeOutOpt = None,
    trace: opts.ServeTraceOpt = None,
    speedup: opts.ServeSpeedupOpt = 1.0,
    limit: opts.ServeLimitOpt = None,
    synthetic: opts.ServeSyntheticOpt = False,
    concurrency: opts.ServeConcurrencyOpt = 8,
    num_requests: opts.ServeNumRequestsOpt = 100,
    prompt_tokens: opts.ServePromptTokensOpt = 256,
    output_tokens: opts.ServeOutputTokensOpt = 64,
    block_size: opts.ServeBlockSizeOpt = 512,
    vocab_size: opts.ServeVocabSizeOpt = 32_000,
    seed: opts.ServeSeedOpt = 0,
    model_name: opts.ServeModelNameOpt = None,
    api_key: opts.ServeApiKeyOpt = None,
    label: opts.ServeLabelOpt = None,
    compare: opts.ServeCompareOpt = False,
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
