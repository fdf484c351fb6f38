"""``strata worker``: typer options -> ``WorkerConfig`` (validated once) -> ``run_worker``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from serving.engine.config import EngineConfig
from serving.kvcache.config import KVTierConfig
from serving.worker.config import WorkerConfig
from serving.worker.efa import SYSFS_INFINIBAND


def worker(
    model: Annotated[
        Path | None, typer.Option("--model", envvar="STRATA_MODEL", help="Checkpoint directory.")
    ] = None,
    engine: Annotated[str, typer.Option(envvar="STRATA_ENGINE", help="builtin | mock")] = "builtin",
    host: Annotated[str, typer.Option(envvar="STRATA_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STRATA_PORT")] = 8001,
    served_model_name: Annotated[
        list[str] | None, typer.Option(help="Name(s) clients use; default: the directory name.")
    ] = None,
    kv_events_port: Annotated[
        int | None,
        typer.Option(
            envvar="STRATA_KV_EVENTS_PORT",
            help="Publish KV events (ZMQ PUB) here; replay on the next port. Off by default.",
        ),
    ] = None,
    block_size: Annotated[int, typer.Option()] = 16,
    num_blocks: Annotated[
        int | None, typer.Option(help="KV blocks (default: from memory).")
    ] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="KV cache size in GiB.")] = None,
    max_num_seqs: Annotated[int, typer.Option()] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option()] = 2048,
    max_model_len: Annotated[int | None, typer.Option()] = None,
    device: Annotated[
        str, typer.Option(envvar="STRATA_DEVICE", help="cpu | cuda | cuda:N")
    ] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    load_format: Annotated[
        str, typer.Option(help="auto | dummy (random weights from config.json, benchmarks).")
    ] = "auto",
    gpu_memory_utilization: Annotated[float, typer.Option()] = 0.9,
    no_prefix_caching: Annotated[bool, typer.Option("--no-prefix-caching")] = False,
    enforce_eager: Annotated[
        bool,
        typer.Option(
            "--enforce-eager",
            envvar="STRATA_ENFORCE_EAGER",
            help="CUDA: run decode steps eagerly instead of replaying CUDA graphs (as vLLM's).",
        ),
    ] = False,
    kernels: Annotated[
        str,
        typer.Option(
            envvar="STRATA_KERNELS",
            help="auto (Triton kernels on CUDA, the PyTorch path on CPU) | torch | triton.",
        ),
    ] = "auto",
    speedup: Annotated[float, typer.Option(help="Mock engine: divide modelled times.")] = 1.0,
    timing_profile: Annotated[
        Path | None, typer.Option(help="Mock engine: measured timing profile (JSON).")
    ] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Mock engine without --model.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    role: Annotated[
        str,
        typer.Option(
            envvar="STRATA_ROLE",
            help="prefill | decode | both (disaggregated serving; any role serves any request).",
        ),
    ] = "both",
    kv_transport: Annotated[
        str | None,
        typer.Option(
            help="KV transfer: auto (NIXL, else TCP, loudly) | nixl | tcp | none. "
            "Default: auto for prefill/decode, none for both."
        ),
    ] = None,
    kv_transfer_host: Annotated[
        str | None, typer.Option(help="Address peers pull KV from (default: --host).")
    ] = None,
    kv_transfer_port: Annotated[int, typer.Option(help="KV side-channel port (0: any).")] = 0,
    kv_lease: Annotated[
        float, typer.Option(help="Seconds a prefill result waits for its decode pull.")
    ] = 30.0,
    mock_kv_bandwidth_gbps: Annotated[
        float, typer.Option(help="Mock engine: modelled KV transfer bandwidth (GB/s).")
    ] = 25.0,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to drain on SIGTERM.")] = 30.0,
    efa: Annotated[
        str,
        typer.Option(
            envvar="STRATA_EFA",
            help="EFA check at start: off | required (no EFA device: exit with the reason) | "
            "fallback (no EFA device: run on TCP, report efa=fallback in strata_worker_info).",
        ),
    ] = "off",
    efa_sysfs_dir: Annotated[
        Path, typer.Option(envvar="STRATA_EFA_SYSFS_DIR", help="Where RDMA devices are listed.")
    ] = SYSFS_INFINIBAND,
    kv_host_gib: Annotated[
        float, typer.Option(envvar="STRATA_KV_HOST_GIB", help="KV tier G2: host memory (GiB).")
    ] = 0.0,
    kv_disk_gib: Annotated[
        float, typer.Option(envvar="STRATA_KV_DISK_GIB", help="KV tier G3: local disk (GiB).")
    ] = 0.0,
    kv_disk_dir: Annotated[
        Path | None,
        typer.Option(envvar="STRATA_KV_DISK_DIR", help="KV tier G3: this worker's directory."),
    ] = None,
    kv_s3_uri: Annotated[
        str | None,
        typer.Option(
            envvar="STRATA_KV_S3_URI",
            help="KV tier G4: s3://bucket/prefix shared by every worker of this model version "
            "(endpoint and credentials from the AWS variables, e.g. AWS_ENDPOINT_URL_S3).",
        ),
    ] = None,
    kv_s3_gib: Annotated[
        float | None,
        typer.Option(envvar="STRATA_KV_S3_GIB", help="KV tier G4: cap on this worker's writes."),
    ] = None,
    kv_offload_min_uses: Annotated[
        int,
        typer.Option(
            envvar="STRATA_KV_OFFLOAD_MIN_USES",
            help="Requests that must use a KV block before a deeper tier (G3, G4) gets a copy.",
        ),
    ] = 2,
    kv_cost_check: Annotated[
        bool,
        typer.Option(
            envvar="STRATA_KV_COST_CHECK",
            help="Onboard a prefix from a lower KV tier only when moving it is estimated faster "
            "than recomputing it (off: always onboard what is found).",
        ),
    ] = True,
    kv_s3_list_interval: Annotated[
        float,
        typer.Option(help="Seconds between listings of the S3 tier (others' blocks)."),
    ] = 5.0,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run one inference worker: OpenAI HTTP API, KV events over ZMQ, Prometheus metrics."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = WorkerConfig(
            engine=EngineConfig(
                model_dir=model,
                engine=engine,
                device=device,
                dtype=dtype,
                load_format=load_format,
                block_size=block_size,
                num_blocks=num_blocks,
                kv_cache_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None,
                gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_prefix_caching=not no_prefix_caching,
                enforce_eager=enforce_eager,
                kernels=kernels,
                speedup=speedup,
                timing_profile=timing_profile,
                vocab_size=vocab_size,
                kv_lease_s=kv_lease,
                seed=seed,
            ),
            host=host,
            port=port,
            served_model_name=served_model_name or [],
            kv_events_port=kv_events_port,
            drain_timeout_s=drain_timeout,
            log_level=log_level,
            role=role,
            kv_transport=kv_transport,
            kv_transfer_host=kv_transfer_host,
            kv_transfer_port=kv_transfer_port,
            mock_kv_bandwidth_gbps=mock_kv_bandwidth_gbps,
            efa=efa,
            efa_sysfs_dir=efa_sysfs_dir,
            kv_tiers=KVTierConfig(
                host_gib=kv_host_gib,
                disk_gib=kv_disk_gib,
                disk_dir=kv_disk_dir,
                s3_uri=kv_s3_uri,
                s3_gib=kv_s3_gib,
                min_uses=kv_offload_min_uses,
                s3_list_interval_s=kv_s3_list_interval,
                cost_check=kv_cost_check,
            ),
        )
    except ValidationError as exc:
        raise typer.BadParameter(_describe(exc)) from None
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
