"""``strata bench``'s options: one ``Annotated`` alias per option, so that each command's
signature stays one line per option. Every option has a ``STRATA_BENCH_*`` environment fallback
shown in ``--help``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _opt(*names: str, help: str, env: str) -> object:
    return typer.Option(*names, help=help, envvar=f"STRATA_BENCH_{env}", show_envvar=True)


# -- replay's options (one alias each; the command's signature stays one line per option)

# the trace and the pools
TraceOpt = Annotated[
    Path,
    _opt("--trace", help="Mooncake-format JSONL trace, or an Azure LLM trace (.csv).", env="TRACE"),
]
WorkersOpt = Annotated[
    int | None,
    _opt(
        "--workers",
        help="Aggregated engines (prefill + decode); default 8, 0 with --prefill/--decode.",
        env="WORKERS",
    ),
]
PrefillOpt = Annotated[
    int,
    _opt("--prefill", help="Prefill-only engines (disaggregated, offline).", env="PREFILL"),
]
DecodeOpt = Annotated[
    int,
    _opt("--decode", help="Decode-only engines (disaggregated, offline).", env="DECODE"),
]
KvBandwidthGbpsOpt = Annotated[
    float,
    _opt(
        "--kv-bandwidth-gbps",
        help="Disaggregated: KV pull bandwidth, GB/s; a pull takes tokens * 128 KiB / this.",
        env="KV_BANDWIDTH_GBPS",
    ),
]
MaxLocalPrefillTokensOpt = Annotated[
    int,
    _opt(
        "--max-local-prefill-tokens",
        help="Disaggregated: the decode engine prefills itself when the uncached part of the "
        "prompt is under this many tokens (and under --max-local-prefill-fraction of it).",
        env="MAX_LOCAL_PREFILL_TOKENS",
    ),
]
MaxLocalPrefillFractionOpt = Annotated[
    float,
    _opt(
        "--max-local-prefill-fraction",
        help="Disaggregated: ... and under this share of the prompt.",
        env="MAX_LOCAL_PREFILL_FRACTION",
    ),
]

# routing and engines
RouterOpt = Annotated[
    list[str],
    _opt(
        "--router",
        help="Routing policy: kv, approx, round-robin, random, least-loaded, session. "
        "Repeat (or comma-separate) to compare several on the same trace.",
        env="ROUTER",
    ),
]
EngineOpt = Annotated[str, _opt("--engine", help="Engine behind each worker.", env="ENGINE")]
KvBlocksPerWorkerOpt = Annotated[
    int, _opt("--kv-blocks-per-worker", help="KV blocks per engine.", env="KV_BLOCKS")
]
BlockSizeOpt = Annotated[
    int, _opt("--block-size", help="Tokens per trace hash id and KV block.", env="BLOCK_SIZE")
]
KvPrefillScaleOpt = Annotated[
    float,
    _opt(
        "--kv-prefill-scale",
        help="kv/approx cost: weight of each uncached prompt block against active KV blocks.",
        env="KV_PREFILL_SCALE",
    ),
]
MaxNumSeqsOpt = Annotated[int, _opt("--max-num-seqs", help="Per engine.", env="MAX_NUM_SEQS")]
MaxNumBatchedTokensOpt = Annotated[
    int,
    _opt("--max-num-batched-tokens", help="Per engine step.", env="MAX_NUM_BATCHED_TOKENS"),
]
TimingProfileOpt = Annotated[
    Path | None,
    _opt("--timing-profile", help="Mock engine timing profile (JSON).", env="PROFILE"),
]

# KV tiers
KvHostBlocksPerWorkerOpt = Annotated[
    int,
    _opt(
        "--kv-host-blocks-per-worker",
        help="KV tiers: G2 (host memory) blocks behind each engine; 0: none.",
        env="KV_HOST_BLOCKS",
    ),
]
KvS3BlocksOpt = Annotated[
    int,
    _opt(
        "--kv-s3-blocks",
        help="KV tiers: blocks of one G4 (S3) tier shared by every engine; 0: none.",
        env="KV_S3_BLOCKS",
    ),
]
KvS3BandwidthGbpsOpt = Annotated[
    float,
    _opt("--kv-s3-bandwidth-gbps", help="KV tiers: G4 -> device GB/s.", env="KV_S3_GBPS"),
]

# the run
ModeOpt = Annotated[str, _opt("--mode", help="offline (virtual time) | online (HTTP).", env="MODE")]
SpeedupOpt = Annotated[
    float, _opt("--speedup", help="Divide trace arrival times by this.", env="SPEEDUP")
]
LimitOpt = Annotated[
    int | None, _opt("--limit", help="Replay only the first K requests.", env="LIMIT")
]
ArrivalJitterSOpt = Annotated[
    float | None,
    _opt(
        "--arrival-jitter-s",
        help="Spread each arrival uniformly over this many trace seconds (default 0; "
        "--planner: 3, the Mooncake trace's bucket).",
        env="ARRIVAL_JITTER_S",
    ),
]
SeedOpt = Annotated[int, _opt("--seed", help="Tokens, policies, jitter.", env="SEED")]
UrlOpt = Annotated[str | None, _opt("--url", help="Online mode: OpenAI base URL.", env="URL")]
OutOpt = Annotated[
    Path | None,
    _opt("--out", help="JSON report (default: bench/results/replay-*.json).", env="OUT"),
]
OnlineModelOpt = Annotated[
    Path,
    typer.Option(help="Online mode without --url: checkpoint dir for `strata serve`."),
]

# the --planner day study
PlannerOpt = Annotated[
    list[str] | None,
    _opt(
        "--planner",
        help="Instead of routers: a day of the trace (diurnal cycle, --speedup at the peak)"
        " under these pool sizings: static, reactive, lead-time (repeat or comma-separate);"
        " offline, the planner over the virtual connector. docs/planner.md.",
        env="PLANNER",
    ),
]
LeadTimeSOpt = Annotated[
    float,
    _opt("--lead-time-s", help="--planner: order to serving replica, s.", env="LEAD_TIME_S"),
]
SlaTtftSOpt = Annotated[
    float, _opt("--sla-ttft-s", help="--planner: TTFT target, s.", env="SLA_TTFT_S")
]
SlaItlSOpt = Annotated[
    float, _opt("--sla-itl-s", help="--planner: mean ITL target, s.", env="SLA_ITL_S")
]
DurationSOpt = Annotated[
    float,
    _opt("--duration-s", help="--planner: simulated time measured, s.", env="DURATION_S"),
]
DailyCurveOpt = Annotated[
    str,
    _opt(
        "--daily-curve",
        help="--planner: the day's shape, chat (night trough, midday plateau, evening peak) "
        "or sine (one-day sinusoid); both peak/trough 5.",
        env="DAILY_CURVE",
    ),
]
StaticReplicasOpt = Annotated[
    int | None,
    _opt(
        "--static-replicas",
        help="--planner static: this many replicas (default: what the day's peak five "
        "minutes need by the planner's capacity model).",
        env="STATIC_REPLICAS",
    ),
]
PlannerConfigOpt = Annotated[
    Path | None,
    _opt(
        "--planner-config",
        help="--planner: planner YAML for the planned sizings (roles: both); the study "
        "sets the SLA, lead time and connector.",
        env="PLANNER_CONFIG",
    ),
]


# -- serve's options
ServeRunsOpt = Annotated[
    list[Path] | None,
    typer.Argument(
        help="With --compare: run directories (each holds a run.json).", show_default=False
    ),
]
ServeUrlOpt = Annotated[
    str | None, _opt("--url", help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1.", env="URL")
]
ServeOutOpt = Annotated[
    Path | None, _opt("--out", help="Directory for run.json, *.png, report.html.", env="OUT")
]
ServeTraceOpt = Annotated[
    Path | None,
    _opt("--trace", help="Mooncake JSONL or Azure LLM trace (.csv), open loop.", env="TRACE"),
]
ServeSpeedupOpt = Annotated[
    float, _opt("--speedup", help="Trace: divide arrival times by this.", env="SPEEDUP")
]
ServeLimitOpt = Annotated[
    int | None, _opt("--limit", help="Trace: send only the first K requests.", env="LIMIT")
]
ServeSyntheticOpt = Annotated[
    bool, _opt("--synthetic", help="Constant concurrency, fixed lengths.", env="SYNTHETIC")
]
ServeConcurrencyOpt = Annotated[
    int, _opt("--concurrency", help="Synthetic: requests in flight.", env="CONCURRENCY")
]
ServeNumRequestsOpt = Annotated[
    int, _opt("--num-requests", help="Synthetic: requests in all.", env="NUM_REQUESTS")
]
ServePromptTokensOpt = Annotated[
    int, _opt("--prompt-tokens", help="Synthetic: tokens per prompt.", env="PROMPT_TOKENS")
]
ServeOutputTokensOpt = Annotated[
    int, _opt("--output-tokens", help="Synthetic: max_tokens.", env="OUTPUT_TOKENS")
]
ServeBlockSizeOpt = Annotated[
    int, _opt("--block-size", help="Trace: tokens per hash id.", env="BLOCK_SIZE")
]
ServeVocabSizeOpt = Annotated[
    int, _opt("--vocab-size", help="Prompt token ids are below this.", env="VOCAB_SIZE")
]
ServeSeedOpt = Annotated[int, _opt("--seed", help="Prompt tokens.", env="SEED")]
ServeModelNameOpt = Annotated[
    str | None, _opt("--model", help="Model name (default: the first listed).", env="MODEL")
]
ServeApiKeyOpt = Annotated[
    str | None, _opt("--api-key", help="Bearer token (not written out).", env="API_KEY")
]
ServeLabelOpt = Annotated[
    str | None,
    _opt("--label", help="Run name in reports (default: --out's name).", env="LABEL"),
]
ServeCompareOpt = Annotated[
    bool, typer.Option("--compare", help="Compare the RUNS directories in one report.")
]
