"""``strata serve``: typer options -> ``ServeConfig`` -> ``run_serve``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from serving.kvcache.config import parse_tier_weights
from serving.router.disagg import (
    DEFAULT_MAX_LOCAL_PREFILL_FRACTION,
    DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
)
from serving.router.policies import DEFAULT_PREFILL_SCALE, POLICY_NAMES


def serve(
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            envvar="STRATA_MODEL",
            help="Checkpoint dir, repeatable (one endpoint, many models): "
            "DIR[;name=NAME][;engine=builtin|mock|vllm][;workers=N][;prefill=P][;decode=D]; "
            "the first model's options default to the flags below, the others' to one worker.",
        ),
    ],
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="Aggregated local workers (default 1, or 0 with --prefill/--decode)."
        ),
    ] = None,
    prefill: Annotated[int, typer.Option("--prefill", help="Local prefill workers.")] = 0,
    decode: Annotated[int, typer.Option("--decode", help="Local decode workers.")] = 0,
    kv_transport: Annotated[
        str, typer.Option(help="Prefill/decode workers' KV transfer: auto | nixl | tcp.")
    ] = "auto",
    max_local_prefill_tokens: Annotated[
        int,
        typer.Option(
            help="Disaggregation: a decode worker prefills itself when the uncached prompt is "
            "shorter than this and than --max-local-prefill-fraction of the prompt."
        ),
    ] = DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
    max_local_prefill_fraction: Annotated[float, typer.Option()] = (
        DEFAULT_MAX_LOCAL_PREFILL_FRACTION
    ),
    engine: Annotated[
        str, typer.Option(help="builtin | mock | vllm (stock vLLM servers, docs/vllm.md)")
    ] = "builtin",
    router: Annotated[str, typer.Option(help=" | ".join(POLICY_NAMES))] = "kv",
    host: Annotated[str, typer.Option(envvar="STRATA_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STRATA_PORT")] = 8000,
    reuse_port: Annotated[
        bool,
        typer.Option(
            envvar="STRATA_REUSE_PORT",
            help="Bind with SO_REUSEPORT, so several frontends (e.g. --workers 0 --worker-url "
            "...) share the port; each keeps its own router index and admission counts.",
        ),
    ] = False,
    worker_url: Annotated[
        list[str] | None,
        typer.Option(
            help="External worker: URL[;kv=tcp://h:p][;replay=tcp://h:p][;id=name][;role=R]."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="STRATA_API_KEY", help="One inference key (bearer).")
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            envvar="STRATA_ADMIN_KEY",
            help="Admin credential for /admin (worker registration, key reload); never an "
            "inference key.",
        ),
    ] = None,
    keys_file: Annotated[
        Path | None,
        typer.Option(
            envvar="STRATA_KEYS_FILE",
            help="YAML keys file: sha256-hashed keys with role and requests/tokens per "
            "minute, per-model limits; re-read when it changes (docs/frontend.md).",
        ),
    ] = None,
    max_inflight_requests: Annotated[
        int,
        typer.Option(
            envvar="STRATA_MAX_INFLIGHT_REQUESTS",
            help="Per model: requests in flight beyond which 429 + Retry-After (0: no limit).",
        ),
    ] = 0,
    max_queued_prompt_tokens: Annotated[
        int,
        typer.Option(
            envvar="STRATA_MAX_QUEUED_PROMPT_TOKENS",
            help="Per model: prompt tokens admitted but not at their first token, beyond "
            "which 429 + Retry-After (0: no limit).",
        ),
    ] = 0,
    max_request_bytes: Annotated[
        int,
        typer.Option(envvar="STRATA_MAX_REQUEST_BYTES", help="Request body limit (413)."),
    ] = 8 * 1024 * 1024,
    discovery: Annotated[
        str,
        typer.Option(
            envvar="STRATA_DISCOVERY",
            help="Workers besides --worker-url and registration: static | file (a watched "
            "--discovery-file) | kubernetes (EndpointSlices, --kube-selector).",
        ),
    ] = "static",
    discovery_file: Annotated[
        Path | None,
        typer.Option(envvar="STRATA_DISCOVERY_FILE", help="YAML/JSON list of workers, watched."),
    ] = None,
    kube_namespace: Annotated[
        str | None,
        typer.Option(
            envvar="STRATA_KUBE_NAMESPACE", help="EndpointSlices' namespace (default: the pod's)."
        ),
    ] = None,
    kube_selector: Annotated[
        str,
        typer.Option(envvar="STRATA_KUBE_SELECTOR", help="Label selector of worker slices."),
    ] = "app.kubernetes.io/component=worker",
    served_model_name: Annotated[str | None, typer.Option()] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="Local workers' KV block size (default 16, vLLM 32); the router "
            "takes the workers' own."
        ),
    ] = None,
    migration_limit: Annotated[int, typer.Option()] = 3,
    kv_prefill_scale: Annotated[
        float, typer.Option(help="kv router: weight of an uncached prompt block vs decode load.")
    ] = DEFAULT_PREFILL_SCALE,
    kv_host_gib: Annotated[
        float, typer.Option(envvar="STRATA_KV_HOST_GIB", help="Local workers' KV tier G2 (GiB).")
    ] = 0.0,
    kv_disk_gib: Annotated[
        float, typer.Option(envvar="STRATA_KV_DISK_GIB", help="Local workers' KV tier G3 (GiB).")
    ] = 0.0,
    kv_disk_dir: Annotated[
        Path | None,
        typer.Option(envvar="STRATA_KV_DISK_DIR", help="G3 root: a directory per worker inside."),
    ] = None,
    kv_s3_uri: Annotated[
        str | None,
        typer.Option(
            envvar="STRATA_KV_S3_URI",
            help="G4 root s3://bucket/prefix; each served model's workers share <uri>/<model>.",
        ),
    ] = None,
    kv_tier_weight: Annotated[
        list[str] | None,
        typer.Option(
            help="kv router: credit of a cached block by medium, MEDIUM=WEIGHT (repeatable; "
            "defaults GPU=1, and measured ones for CPU, DISK, S3: docs/kv-tiers.md)."
        ),
    ] = None,
    worker_arg: Annotated[
        list[str] | None,
        typer.Option(help="Extra argument for every local worker, e.g. --worker-arg=--speedup=10"),
    ] = None,
    worker_device: Annotated[
        list[str] | None,
        typer.Option(help="Devices for local workers, round-robin: --worker-device cuda:0 ..."),
    ] = None,
    log_dir: Annotated[Path, typer.Option(help="Where local workers write their logs.")] = Path(
        ".strata/logs"
    ),
    log_level: Annotated[str, typer.Option()] = "info",
    vllm_python: Annotated[
        str | None,
        typer.Option(
            envvar="STRATA_VLLM_PYTHON",
            help="--engine vllm: Python with vLLM "
            "(default: .venv-vllm, else the one behind `vllm` on PATH).",
        ),
    ] = None,
    planner: Annotated[
        bool,
        typer.Option(
            "--planner",
            envvar="STRATA_PLANNER",
            help="Run the planner here: it adds and drains local workers of the first model.",
        ),
    ] = False,
    worker_startup_timeout_s: Annotated[
        float,
        typer.Option(
            envvar="STRATA_WORKER_STARTUP_TIMEOUT_S",
            help="Seconds local workers may take to become healthy (vLLM: at least 1800).",
        ),
    ] = 300.0,
    planner_config: Annotated[
        Path | None,
        typer.Option(
            envvar="STRATA_PLANNER_CONFIG",
            help="Planner config (YAML, docs/planner.md); default: from these flags and the "
            "profile .strata/profiles/<model>.json.",
        ),
    ] = None,
) -> None:
    """Start local workers and the frontend (KV-aware router inside) until Ctrl-C."""
    from serving.frontend.model_entry import ModelEntry, parse_model_entry
    from serving.frontend.serve import ServeConfig, run_serve

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if router not in POLICY_NAMES:
        raise typer.BadParameter(f"--router must be one of {', '.join(POLICY_NAMES)}")
    if engine not in ("builtin", "mock", "vllm"):
        raise typer.BadParameter("--engine must be builtin, mock or vllm")
    if engine == "vllm" and worker_device:
        raise typer.BadParameter("--worker-device: vLLM workers choose their device themselves")
    if min(prefill, decode) < 0 or (workers is not None and workers < 0):
        raise typer.BadParameter("--workers, --prefill and --decode must be >= 0")
    if prefill and not decode and not workers:
        raise typer.BadParameter("--prefill needs --decode or --workers to stream the output")
    if min(max_inflight_requests, max_queued_prompt_tokens) < 0 or max_request_bytes <= 0:
        raise typer.BadParameter(
            "--max-inflight-requests, --max-queued-prompt-tokens must be >= 0, "
            "--max-request-bytes > 0"
        )
    if keys_file is not None and not keys_file.is_file():
        raise typer.BadParameter(f"--keys-file {keys_file}: no such file")
    if discovery not in ("static", "file", "kubernetes"):
        raise typer.BadParameter("--discovery must be static, file or kubernetes")
    if (discovery == "file") != (discovery_file is not None):
        raise typer.BadParameter("--discovery file goes with --discovery-file PATH")
    if kv_transport not in ("auto", "nixl", "tcp"):
        raise typer.BadParameter("--kv-transport must be auto, nixl or tcp")
    if workers is None:
        workers = 0 if prefill or decode else 1
    try:
        first = parse_model_entry(
            model[0], ModelEntry(Path(), served_model_name or "", engine, workers, prefill, decode)
        )
        extra = [parse_model_entry(m, ModelEntry(Path(), "", engine)) for m in model[1:]]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    names = [e.name for e in (first, *extra)]
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"--model: served model names must differ, got {names}")
    config = ServeConfig(
        model_dir=first.model_dir,
        num_workers=first.num_workers,
        num_prefill=first.num_prefill,
        num_decode=first.num_decode,
        extra_models=extra,
        kv_transport=kv_transport,
        max_local_prefill_tokens=max_local_prefill_tokens,
        max_local_prefill_fraction=max_local_prefill_fraction,
        engine=first.engine,
        router=router,  # type: ignore[arg-type]
        host=host,
        port=port,
        reuse_port=reuse_port,
        worker_urls=list(worker_url or []),
        api_key=api_key,
        served_model_name=first.name,
        block_size=block_size or (32 if engine == "vllm" else 16),
        migration_limit=migration_limit,
        kv_prefill_scale=kv_prefill_scale,
        worker_args=list(worker_arg or []),
        worker_devices=list(worker_device or []),
        log_dir=log_dir,
        vllm_python=vllm_python,
        admin_key=admin_key,
        keys_file=keys_file,
        max_inflight_requests=max_inflight_requests,
        max_queued_prompt_tokens=max_queued_prompt_tokens,
        max_request_bytes=max_request_bytes,
        discovery=discovery,  # type: ignore[arg-type]
        discovery_file=discovery_file,
        kube_namespace=kube_namespace,
        kube_selector=kube_selector,
        planner=planner or planner_config is not None,
        planner_config=planner_config,
        startup_timeout_s=worker_startup_timeout_s,
        kv_host_gib=kv_host_gib,
        kv_disk_gib=kv_disk_gib,
        kv_disk_dir=kv_disk_dir,
        kv_s3_uri=kv_s3_uri,
        kv_tier_weights=_tier_weights(kv_tier_weight),
    )
    try:
        run_serve(config)
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _tier_weights(values: list[str] | None) -> dict[str, float]:
    try:
        return parse_tier_weights(list(values or []))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
