"""``strata bench serve``: load an OpenAI endpoint, record every request, write a report.

    strata bench serve --url http://127.0.0.1:8000/v1 --synthetic --concurrency 8 \\
        --num-requests 400 --prompt-tokens 512 --output-tokens 128 --out runs/kv
    strata bench serve --url http://127.0.0.1:8000/v1 --trace trace.jsonl --speedup 2 \\
        --limit 300 --out runs/trace
    strata bench serve --compare runs/kv runs/rr --out runs/kv-vs-rr

Two ways to send load, both streaming ``/v1/completions`` with token-id prompts, ``ignore_eos``
and a fixed ``max_tokens`` (``bench/load.py``'s ``stream_completion``):

* trace (open loop): each Mooncake-format request at ``arrival / speedup`` after the start,
  whatever the backlog; prompts from its hash ids (``bench/trace.py``'s ``PromptBuilder``);
* synthetic (closed loop): ``concurrency`` clients, each sending its next request when the last
  one ends, until ``num_requests`` were sent; every prompt is ``prompt_tokens`` unique tokens.

Meanwhile a Strata frontend's ``/metrics`` is sampled for per-worker load (``bench/serve_probe``).
``DIR/run.json`` holds the config, one record per request and a summary;
``bench/serve_report.py`` draws ``DIR/*.png`` and ``DIR/report.html`` from that file alone.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.load import (
    LoadError,
    StreamResult,
    first_model,
    send_open_loop,
    stream_completion,
    summarize,
)
from bench.serve_probe import WorkerSample, list_workers, root_url, sample_workers
from bench.trace import MOONCAKE_BLOCK_SIZE, PromptBuilder, TraceRequest, load_trace

RUN_FILE = "run.json"


class ServeBenchConfig(BaseModel):
    """One load run, parsed once at the CLI edge. Exactly one of ``trace`` and ``synthetic``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="OpenAI base URL, e.g. http://127.0.0.1:8000/v1.")
    out: Path = Field(description="Directory for run.json, the PNGs and report.html.")
    trace: Path | None = Field(default=None, description="Mooncake-format JSONL trace.")
    speedup: float = Field(default=1.0, gt=0, description="Divide trace arrival times by this.")
    limit: int | None = Field(default=None, ge=1, description="Send the first K trace requests.")
    synthetic: bool = Field(default=False, description="Constant concurrency, fixed lengths.")
    concurrency: int = Field(default=8, ge=1, description="Synthetic: requests in flight.")
    num_requests: int = Field(default=100, ge=1, description="Synthetic: requests in all.")
    prompt_tokens: int = Field(default=256, ge=1, description="Synthetic: tokens per prompt.")
    output_tokens: int = Field(default=64, ge=1, description="Synthetic: max_tokens.")
    block_size: int = Field(default=MOONCAKE_BLOCK_SIZE, ge=1, description="Tokens per hash id.")
    vocab_size: int = Field(default=32_000, ge=2, description="Prompt token ids are below this.")
    seed: int = Field(default=0, description="Prompt tokens.")
    model: str | None = Field(default=None, description="Model name (default: the first listed).")
    label: str | None = Field(default=None, description="Run name in reports (default: out).")
    api_key: str | None = Field(default=None, description="Bearer token; never written out.")
    sample_interval_s: float = Field(default=0.5, gt=0, description="Frontend /metrics period.")
    timeout_s: float = Field(default=600.0, gt=0, description="Per request.")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.trace is None) == (not self.synthetic):
            raise ValueError("give exactly one of --trace FILE and --synthetic")
        return self

    @property
    def run_label(self) -> str:
        return self.label or self.out.resolve().name


def make_requests(config: ServeBenchConfig) -> list[TraceRequest]:
    """The trace's first ``limit`` requests, or ``num_requests`` synthetic ones (no hash ids:
    every prompt is a request-unique tail, so no two share a prefix)."""
    if config.trace is not None:
        requests = load_trace(config.trace, config.limit)
        if not requests:
            raise ValueError(f"{config.trace}: no requests")
        return requests
    return [
        TraceRequest(i, 0.0, config.prompt_tokens, config.output_tokens, ())
        for i in range(config.num_requests)
    ]


async def send_closed_loop(
    client: httpx.AsyncClient,
    model: str,
    requests: Sequence[TraceRequest],
    prompts: PromptBuilder,
    concurrency: int,
    started: float,
) -> list[StreamResult]:
    """``concurrency`` clients share one queue; each sends its next request when one ends."""
    pending = iter(requests)  # one iterator: each request goes to exactly one client
    results: list[StreamResult] = []

    async def one_client() -> None:
        for request in pending:
            prompt = prompts.prompt_token_ids(request)
            results.append(await stream_completion(client, model, request, prompt, started))

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.index)


async def run_load(config: ServeBenchConfig, requests: Sequence[TraceRequest]) -> dict[str, Any]:
    """Send the requests while sampling the frontend; the run as ``run.json`` holds it.

    Raises ``LoadError`` if the endpoint cannot list a model.
    """
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    root = root_url(config.url)
    prompts = PromptBuilder(config.block_size, config.vocab_size, config.seed)
    async with httpx.AsyncClient(
        base_url=config.url.rstrip("/") + "/", headers=headers, timeout=timeout, limits=limits
    ) as client:
        try:
            model = config.model or await first_model(client)
        except httpx.HTTPError as exc:
            raise LoadError(f"cannot list models at {config.url}: {exc}") from exc
        workers_before = await list_workers(client, root)
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        started = time.perf_counter()
        stop = asyncio.Event()
        sampler = asyncio.create_task(
            sample_workers(client, root, started, config.sample_interval_s, stop)
        )
        try:
            if config.synthetic:
                send = send_closed_loop(client, model, requests, prompts, config.concurrency,
                                        started)  # fmt: skip
            else:
                send = send_open_loop(client, model, requests, prompts, config.speedup, started)
            results = await send
        finally:
            stop.set()
            samples = await sampler
        workers_after = await list_workers(client, root)
    arrivals = _arrivals_s(config, requests, results)
    summary, worker_load = _summarize(config, results, samples)
    return {
        "label": config.run_label,
        "config": config.model_dump(mode="json", exclude={"api_key", "out"}),
        "started_at": started_at,
        "endpoint": {
            "model": model,
            "workers_before": workers_before,
            "workers_after": workers_after,
        },
        "summary": summary,
        "requests": [_record(r, arrivals[r.index]) for r in results],
        "worker_load": worker_load,
    }


def _summarize(
    config: ServeBenchConfig, results: Sequence[StreamResult], samples: Sequence[WorkerSample]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's summary (``bench.load.summarize`` plus req/s and requests routed per worker)
    and its ``worker_load`` section (``None`` without frontend samples)."""
    summary = summarize(results, config.run_label)
    summary.pop("policy")
    makespan_s = summary["makespan_s"]
    summary["requests_per_s"] = summary["requests"]["completed"] / makespan_s if makespan_s else 0.0
    if not samples:
        return summary, None
    first, last = samples[0].routed_total, samples[-1].routed_total
    summary["routed_per_worker"] = {w: last[w] - first.get(w, 0.0) for w in sorted(last)}
    worker_load = {
        "interval_s": config.sample_interval_s,
        "policies": sorted({p for s in samples for p in s.policies}),
        "samples": [s.to_dict() for s in samples],
    }
    return summary, worker_load


def _arrivals_s(
    config: ServeBenchConfig, requests: Sequence[TraceRequest], results: Sequence[StreamResult]
) -> dict[int, float]:
    """Intended arrival per request index: the scaled trace time, or (closed loop) when sent."""
    if config.synthetic:
        return {r.index: r.sent_s for r in results}
    t0 = requests[0].arrival_s
    return {r.index: (r.arrival_s - t0) / config.speedup for r in requests}


def _record(result: StreamResult, arrival_s: float) -> dict[str, Any]:
    """One request; times in seconds from the run's start, ``itl_ms`` one gap per token after
    the first (token ``k``'s time = ``sent_s + ttft_s + sum(itl_ms[:k]) / 1000``)."""
    match = re.match(r"HTTP (\d{3})", result.error or "")
    status_code = 200 if result.ok else (int(match.group(1)) if match else None)
    return {
        "index": result.index,
        "arrival_s": round(arrival_s, 4),
        "sent_s": round(result.sent_s, 4),
        "ttft_s": None if result.first_token_s is None else round(result.first_token_s, 5),
        "finished_s": None if result.finished_s is None else round(result.finished_s, 4),
        "prompt_tokens": result.prompt_tokens,
        "output_tokens": result.output_tokens,
        "cached_tokens": result.cached_tokens,
        "status_code": status_code,
        "error": result.error,
        "itl_ms": [round(gap * 1000.0, 2) for gap in result.itl_s],
    }


def write_run(run: dict[str, Any], out: Path) -> Path:
    """``out/run.json``: indented, one line per request record and per load sample."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_FILE
    head = {k: v for k, v in run.items() if k not in ("requests", "worker_load")}
    text = json.dumps(head, indent=2)[:-2]  # reopen the object to append the long lists
    records = ",\n    ".join(json.dumps(r, separators=(",", ":")) for r in run["requests"])
    text += f',\n  "requests": [\n    {records}\n  ],\n  "worker_load": '
    load = run.get("worker_load")
    if load is None:
        text += "null"
    else:
        lines = ",\n      ".join(json.dumps(s, separators=(",", ":")) for s in load["samples"])
        rest = json.dumps({k: v for k, v in load.items() if k != "samples"})[:-1]
        text += f'{rest}, "samples": [\n      {lines}\n  ]}}'
    path.write_text(text + "\n}\n")
    return path


def read_run(path: Path) -> dict[str, Any]:
    """A ``run.json`` (or the directory holding one); raises ``ValueError`` naming the file."""
    path = Path(path)
    file = path / RUN_FILE if path.is_dir() else path
    try:
        run = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read run {file}: {exc}") from exc
    if not isinstance(run, dict) or "requests" not in run or "summary" not in run:
        raise ValueError(f"{file}: not a `strata bench serve` run.json")
    return run


def run_serve_bench(config: ServeBenchConfig) -> dict[str, Any]:
    """Load the endpoint, write ``run.json`` and the report into ``config.out``; the run."""
    from bench.serve_report import write_report

    run = asyncio.run(run_load(config, make_requests(config)))
    write_run(run, config.out)
    write_report(run, config.out)
    return run
