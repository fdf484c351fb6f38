"""``strata worker``: typer options -> ``WorkerConfig`` (validated once) -> ``run_worker``.

Each option is one ``Annotated`` alias below, so that ``worker``'s signature stays one line per
option; the command's body parses (``parse_config``) and starts (``start``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from serving.engine.config import EngineConfig
from serving.kvcache.config import KVTierConfig
from serving.worker.config import WorkerConfig
from serving.worker.efa import SYSFS_INFINIBAND

# -- the engine and the HTTP server
ModelOpt = Annotated[
    Path | None, typer.Option("--model", envvar="STRATA_MODEL", help="Checkpoint directory.")
]
EngineOpt = Annotated[str, typer.Option(envvar="STRATA_ENGINE", help="builtin | mock")]
HostOpt = Annotated[str, typer.Option(envvar="STRATA_HOST")]
PortOpt = Annotated[int, typer.Option(envvar="STRATA_PORT")]
ServedModelNameOpt = Annotated[
    list[str] | None, typer.Option(help="Name(s) clients use; default: the directory name.")
]
KvEventsPortOpt = Annotated[
    int | None,
    typer.Option(
        envvar="STRATA_KV_EVENTS_PORT",
        help="Publish KV events (ZMQ PUB) here; replay on the next port. Off by default.",
    ),
]
BlockSizeOpt = Annotated[int, typer.Option()]
NumBlocksOpt = Annotated[int | None, typer.Option(help="KV blocks (default: from memory).")]
KvCacheGibOpt = Annotated[float | None, typer.Option(help="KV cache size in GiB.")]
MaxNumSeqsOpt = Annotated[int, typer.Option()]
MaxNumBatchedTokensOpt = Annotated[int, typer.Option()]
MaxModelLenOpt = Annotated[int | None, typer.Option()]
DeviceOpt = Annotated[str, typer.Option(envvar="STRATA_DEVICE", help="cpu | cuda | cuda:N")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")]
LoadFormatOpt = Annotated[
    str, typer.Option(help="auto | dummy (random weights from config.json, benchmarks).")
]
GpuMemoryUtilizationOpt = Annotated[float, typer.Option()]
NoPrefixCachingOpt = Annotated[bool, typer.Option("--no-prefix-caching")]
EnforceEagerOpt = Annotated[
    bool,
    typer.Option(
        "--enforce-eager",
        envvar="STRATA_ENFORCE_EAGER",
        help="CUDA: run decode steps eagerly instead of replaying CUDA graphs (as vLLM's).",
    ),
]
KernelsOpt = Annotated[
    str,
    typer.Option(
        envvar="STRATA_KERNELS",
        help="auto (Triton kernels on CUDA, the PyTorch path on CPU) | torch | triton.",
    ),
]
# -- the mock engine
SpeedupOpt = Annotated[float, typer.Option(help="Mock engine: divide modelled times.")]
TimingProfileOpt = Annotated[
    Path | None, typer.Option(help="Mock engine: measured timing profile (JSON).")
]
VocabSizeOpt = Annotated[int | None, typer.Option(help="Mock engine without --model.")]
SeedOpt = Annotated[int, typer.Option()]
# -- disaggregation and KV transfer
RoleOpt = Annotated[
    str,
    typer.Option(
        envvar="STRATA_ROLE",
        help="prefill | decode | both (disaggregated serving; any role serves any request).",
    ),
]
KvTransportOpt = Annotated[
    str | None,
    typer.Option(
        help="KV transfer: auto (NIXL, else TCP, loudly) | nixl | tcp | none. "
        "Default: auto for prefill/decode, none for both."
    ),
]
KvTransferHostOpt = Annotated[
    str | None, typer.Option(help="Address peers pull KV from (default: --host).")
]
KvTransferPortOpt = Annotated[int, typer.Option(help="KV side-channel port (0: any).")]
KvLeaseOpt = Annotated[
    float, typer.Option(help="Seconds a prefill result waits for its decode pull.")
]
MockKvBandwidthGbpsOpt = Annotated[
    float, typer.Option(help="Mock engine: modelled KV transfer bandwidth (GB/s).")
]
DrainTimeoutOpt = Annotated[float, typer.Option(help="Seconds to drain on SIGTERM.")]
EfaOpt = Annotated[
    str,
    typer.Option(
        envvar="STRATA_EFA",
        help="EFA check at start: off | required (no EFA device: exit with the reason) | "
        "fallback (no EFA device: run on TCP, report efa=fallback in strata_worker_info).",
    ),
]
EfaSysfsDirOpt = Annotated[
    Path, typer.Option(envvar="STRATA_EFA_SYSFS_DIR", help="Where RDMA devices are listed.")
]
# -- KV tiers G2-G4
KvHostGibOpt = Annotated[
    float, typer.Option(envvar="STRATA_KV_HOST_GIB", help="KV tier G2: host memory (GiB).")
]
KvDiskGibOpt = Annotated[
    float, typer.Option(envvar="STRATA_KV_DISK_GIB", help="KV tier G3: local disk (GiB).")
]
KvDiskDirOpt = Annotated[
    Path | None,
    typer.Option(envvar="STRATA_KV_DISK_DIR", help="KV tier G3: this worker's directory."),
]
KvS3UriOpt = Annotated[
    str | None,
    typer.Option(
        envvar="STRATA_KV_S3_URI",
        help="KV tier G4: s3://bucket/prefix shared by every worker of this model version "
        "(endpoint and credentials from the AWS variables, e.g. AWS_ENDPOINT_URL_S3).",
    ),
]
KvS3GibOpt = Annotated[
    float | None,
    typer.Option(envvar="STRATA_KV_S3_GIB", help="KV tier G4: cap on this worker's writes."),
]
KvOffloadMinUsesOpt = Annotated[
    int,
    typer.Option(
        envvar="STRATA_KV_OFFLOAD_MIN_USES",
        help="Requests that must use a KV block before a deeper tier (G3, G4) gets a copy.",
    ),
]
KvCostCheckOpt = Annotated[
    bool,
    typer.Option(
        envvar="STRATA_KV_COST_CHECK",
        help="Onboard a prefix from a lower KV tier only when moving it is estimated faster "
        "than recomputing it (off: always onboard what is found).",
    ),
]
KvS3ListIntervalOpt = Annotated[
    float, typer.Option(help="Seconds between listings of the S3 tier (others' blocks).")
]
LogLevelOpt = Annotated[str, typer.Option()]


def worker(
    model: ModelOpt = None,
    engine: EngineOpt = "builtin",
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8001,
    served_model_name: ServedModelNameOpt = None,
    kv_events_port: KvEventsPortOpt = None,
    block_size: BlockSizeOpt = 16,
    num_blocks: NumBlocksOpt = None,
    kv_cache_gib: KvCacheGibOpt = None,
    max_num_seqs: MaxNumSeqsOpt = 64,
    max_num_batched_tokens: MaxNumBatchedTokensOpt = 2048,
    max_model_len: MaxModelLenOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    load_format: LoadFormatOpt = "auto",
    gpu_memory_utilization: GpuMemoryUtilizationOpt = 0.9,
    no_prefix_caching: NoPrefixCachingOpt = False,
    enforce_eager: EnforceEagerOpt = False,
    kernels: KernelsOpt = "auto",
    speedup: SpeedupOpt = 1.0,
    timing_profile: TimingProfileOpt = None,
    vocab_size: VocabSizeOpt = None,
    seed: SeedOpt = 0,
    role: RoleOpt = "both",
    kv_transport: KvTransportOpt = None,
    kv_transfer_host: KvTransferHostOpt = None,
    kv_transfer_port: KvTransferPortOpt = 0,
    kv_lease: KvLeaseOpt = 30.0,
    mock_kv_bandwidth_gbps: MockKvBandwidthGbpsOpt = 25.0,
    drain_timeout: DrainTimeoutOpt = 30.0,
    efa: EfaOpt = "off",
    efa_sysfs_dir: EfaSysfsDirOpt = SYSFS_INFINIBAND,
    kv_host_gib: KvHostGibOpt = 0.0,
    kv_disk_gib: KvDiskGibOpt = 0.0,
    kv_disk_dir: KvDiskDirOpt = None,
    kv_s3_uri: KvS3UriOpt = None,
    kv_s3_gib: KvS3GibOpt = None,
    kv_offload_min_uses: KvOffloadMinUsesOpt = 2,
    kv_cost_check: KvCostCheckOpt = True,
    kv_s3_list_interval: KvS3ListIntervalOpt = 5.0,
    log_level: LogLevelOpt = "info",
) -> None:
    """Run one inference worker: OpenAI HTTP API, KV events over ZMQ, Prometheus metrics."""
    options = dict(locals())  # first statement: exactly the options, by parameter name
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    start(parse_config(options))


def parse_config(options: dict[str, Any]) -> WorkerConfig:
    """The command's options (by parameter name) -> one validated ``WorkerConfig``.

    A validation error becomes ``typer.BadParameter`` naming the bad fields (exit status 2).
    """
    try:
        return make_config(SimpleNamespace(**options))
    except ValidationError as exc:
        raise typer.BadParameter(_describe(exc)) from None


def make_config(o: SimpleNamespace) -> WorkerConfig:
    """Build the config from the options; raises pydantic's ``ValidationError``."""
    return WorkerConfig(
        engine=_make_engine_config(o),
        host=o.host,
        port=o.port,
        served_model_name=o.served_model_name or [],
        kv_events_port=o.kv_events_port,
        drain_timeout_s=o.drain_timeout,
        log_level=o.log_level,
        role=o.role,
        kv_transport=o.kv_transport,
        kv_transfer_host=o.kv_transfer_host,
        kv_transfer_port=o.kv_transfer_port,
        mock_kv_bandwidth_gbps=o.mock_kv_bandwidth_gbps,
        efa=o.efa,
        efa_sysfs_dir=o.efa_sysfs_dir,
        kv_tiers=_make_tier_config(o),
    )


def _make_engine_config(o: SimpleNamespace) -> EngineConfig:
    return EngineConfig(
        model_dir=o.model,
        engine=o.engine,
        device=o.device,
        dtype=o.dtype,
        load_format=o.load_format,
        block_size=o.block_size,
        num_blocks=o.num_blocks,
        kv_cache_bytes=int(o.kv_cache_gib * 2**30) if o.kv_cache_gib else None,
        gpu_memory_utilization=o.gpu_memory_utilization,
        max_num_seqs=o.max_num_seqs,
        max_num_batched_tokens=o.max_num_batched_tokens,
        max_model_len=o.max_model_len,
        enable_prefix_caching=not o.no_prefix_caching,
        enforce_eager=o.enforce_eager,
        kernels=o.kernels,
        speedup=o.speedup,
        timing_profile=o.timing_profile,
        vocab_size=o.vocab_size,
        kv_lease_s=o.kv_lease,
        seed=o.seed,
    )


def _make_tier_config(o: SimpleNamespace) -> KVTierConfig:
    return KVTierConfig(
        host_gib=o.kv_host_gib,
        disk_gib=o.kv_disk_gib,
        disk_dir=o.kv_disk_dir,
        s3_uri=o.kv_s3_uri,
        s3_gib=o.kv_s3_gib,
        min_uses=o.kv_offload_min_uses,
        s3_list_interval_s=o.kv_s3_list_interval,
        cost_check=o.kv_cost_check,
    )


def start(config: WorkerConfig) -> None:
    """Run the worker until it stops; its ``ValueError``/``RuntimeError`` exits with status 2."""
    from serving.worker.server import run_worker

    try:
        run_worker(config)
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "engine")
        parts.append(f"{loc or 'config'}: {err['msg']}")
    return "; ".join(parts)
