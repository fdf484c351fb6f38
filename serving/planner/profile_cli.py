"""``strata profile``: typer options -> an engine (or an endpoint) -> a measured profile file.

strata profile --model DIR [--engine builtin|mock] [--url URL] --out FILE
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from serving.engine.config import EngineConfig
    from serving.planner.profile import PerfProfile


def _opt(*names: str, help: str, env: str) -> object:
    return typer.Option(*names, help=help, envvar=f"STRATA_PROFILE_{env}", show_envvar=True)


def profile(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            envvar="STRATA_MODEL",
            show_envvar=True,
            help="Checkpoint directory (its config.json gives the vocabulary).",
        ),
    ],
    out: Annotated[Path, _opt("--out", help="Profile JSON to write.", env="OUT")],
    engine: Annotated[
        str, _opt("--engine", help="builtin | mock (measured in this process).", env="ENGINE")
    ] = "builtin",
    url: Annotated[
        str | None,
        _opt("--url", help="Measure this OpenAI endpoint instead (e.g. a worker).", env="URL"),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="STRATA_API_KEY", show_envvar=True, help="For --url.")
    ] = None,
    device: Annotated[str, _opt("--device", help="cpu | cuda | cuda:N", env="DEVICE")] = "cpu",
    dtype: Annotated[str, _opt("--dtype", help="auto | float32 | bfloat16", env="DTYPE")] = "auto",
    block_size: Annotated[int, _opt("--block-size", help="KV block size.", env="BLOCK_SIZE")] = 16,
    num_blocks: Annotated[
        int | None, _opt("--num-blocks", help="KV blocks (default: engine's).", env="NUM_BLOCKS")
    ] = None,
    max_num_seqs: Annotated[
        int, _opt("--max-num-seqs", help="Sequences per step.", env="MAX_NUM_SEQS")
    ] = 64,
    max_num_batched_tokens: Annotated[
        int,
        _opt("--max-num-batched-tokens", help="Tokens per step.", env="MAX_NUM_BATCHED_TOKENS"),
    ] = 2048,
    max_model_len: Annotated[
        int | None, _opt("--max-model-len", help="Context limit.", env="MAX_MODEL_LEN")
    ] = None,
    timing_profile: Annotated[
        Path | None,
        _opt("--timing-profile", help="Mock engine: its timing profile.", env="TIMING_PROFILE"),
    ] = None,
    prefill_lengths: Annotated[
        str | None,
        _opt(
            "--prefill-lengths",
            help="Prompt tokens per prefill point, e.g. 16,64,256.",
            env="PREFILL_LENGTHS",
        ),
    ] = None,
    batch_sizes: Annotated[
        str | None,
        _opt("--batch-sizes", help="Decode batch sizes, e.g. 1,4,16.", env="BATCH_SIZES"),
    ] = None,
    context_lengths: Annotated[
        str | None,
        _opt(
            "--context-lengths",
            help="Decode context lengths, e.g. 128,1024.",
            env="CONTEXT_LENGTHS",
        ),
    ] = None,
) -> None:
    """Measure prefill time vs prompt length and decode step time vs batch and context."""
    from serving.planner.profiler import parse_int_list

    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"--model {model}: no config.json there")
    try:
        lists = PlanLists(
            *(parse_int_list(v) for v in (prefill_lengths, batch_sizes, context_lengths))
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if url is not None:
        result = _profile_url(url, model, api_key, max_num_seqs, lists)
    else:
        if engine not in ("builtin", "mock"):
            raise typer.BadParameter("--engine must be builtin or mock")
        from serving.engine.config import EngineConfig

        try:
            config = EngineConfig(
                model_dir=model,
                engine=engine,
                device=device,
                dtype=dtype,
                block_size=block_size,
                num_blocks=num_blocks,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_prefix_caching=False,  # random prompts never hit; skip the hashing
                timing_profile=timing_profile,
            )
        except ValidationError as exc:
            raise typer.BadParameter(str(exc.errors()[0]["msg"])) from None
        result = _profile_engine(config, lists)
    result.save(out)
    grid = result.decode_grid
    typer.echo(
        f"wrote {out}: {len(result.prefill)} prefill points, decode grid "
        f"{len(grid.batch_sizes)} batch sizes x {len(grid.context_tokens)} contexts"
    )


@dataclass(frozen=True, slots=True)
class PlanLists:
    """The grid the user asked for; None: the default for that axis."""

    prefill_tokens: tuple[int, ...] | None
    batch_sizes: tuple[int, ...] | None
    context_tokens: tuple[int, ...] | None


def _profile_engine(config: EngineConfig, lists: PlanLists) -> PerfProfile:
    from serving.engine.factory import build_engine
    from serving.planner.profiler import default_plan, override_plan, profile_engine

    try:
        loaded = build_engine(config)
        plan = override_plan(
            default_plan(loaded.core, wall_clock=config.engine != "mock"),
            lists.prefill_tokens,
            lists.batch_sizes,
            lists.context_tokens,
        )
        return profile_engine(
            loaded.core,
            engine=config.engine,
            model=loaded.info.name,
            device=config.device,
            vocab_size=loaded.info.vocab_size,
            plan=plan,
            progress=typer.echo,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _profile_url(
    url: str, model: Path, api_key: str | None, max_num_seqs: int, lists: PlanLists
) -> PerfProfile:
    from serving.planner.profile_http import EndpointError, profile_endpoint
    from serving.planner.profiler import ProfilePlan

    plan = ProfilePlan(
        prefill_tokens=lists.prefill_tokens or (16, 64, 256, 1024),
        batch_sizes=lists.batch_sizes or (1, 4, 16),
        context_tokens=lists.context_tokens or (128, 512),
        decode_steps=8,
        repeats=3,
    )
    vocab_size = int(json.loads((model / "config.json").read_text())["vocab_size"])
    try:
        return profile_endpoint(
            url,
            vocab_size=vocab_size,
            plan=plan,
            max_num_seqs=max_num_seqs,
            api_key=api_key,
            progress=typer.echo,
        )
    except (EndpointError, httpx.HTTPError) as exc:
        typer.echo(f"error: measuring {url}: {exc}", err=True)
        raise typer.Exit(2) from None
