"""``strata bench replay --mode online``: the trace over HTTP against a live endpoint, or
against ``strata serve`` with mock workers started per policy. Wall-clock figures."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.replay import load_requests
from bench.replay_config import REPO_ROOT, ReplayConfig
from bench.replay_report import report_head
from bench.trace import PromptBuilder, TraceRequest


def run_online(config: ReplayConfig, requests: Sequence[TraceRequest] | None = None) -> dict:
    """Replay the trace over HTTP against ``config.url`` (an OpenAI base URL ending in /v1).

    The endpoint routes with whatever policy it was started with; the report's column is named
    after ``config.routers[0]``. Figures are wall-clock measurements, not reproducible.
    """
    from bench.load import replay_online, summarize

    if config.url is None:
        raise ValueError("online mode needs the endpoint's base URL (--url)")
    if requests is None:
        requests = load_requests(config)
    prompts = PromptBuilder(config.block_size, config.vocab_size, config.seed)
    report, shared = report_head(config, requests)
    started = time.perf_counter()
    results = asyncio.run(replay_online(config.url, requests, prompts, speedup=config.speedup))
    name = config.routers[0]
    figures = summarize(results, name)
    figures["hit_rate_of_shared_bound"] = figures["hit_rate"] / shared if shared else 0.0
    report["policies"][name] = figures
    report["runtime"]["policies_s"][name] = time.perf_counter() - started
    return report


def run_online_managed(config: ReplayConfig, model_dir: Path) -> dict:
    """Online mode without ``--url``: for each policy, start ``strata serve`` (mock workers
    with this replay's KV size, block size and speedup), replay over HTTP, stop it."""
    import signal
    import subprocess

    from serving.netutil import free_port, wait_healthy

    requests = load_requests(config)
    report: dict[str, Any] | None = None
    for policy in config.routers:
        port = free_port()
        cmd = [
            sys.executable, "-m", "workflows.cli", "serve", "--model", str(model_dir),
            "--workers", str(config.workers), "--engine", "mock", "--router", policy,
            "--port", str(port), "--block-size", str(config.block_size),
            "--kv-prefill-scale", str(config.kv_prefill_scale), "--log-level", "warning",
            f"--worker-arg=--num-blocks={config.kv_blocks_per_worker}",
            f"--worker-arg=--max-model-len={config.kv_blocks_per_worker * config.block_size}",
            f"--worker-arg=--speedup={config.speedup}",
            f"--worker-arg=--max-num-seqs={config.max_num_seqs}",
            f"--worker-arg=--max-num-batched-tokens={config.max_num_batched_tokens}",
        ]  # fmt: skip
        serve = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, serve, timeout_s=300)
            one = config.model_copy(update={"url": f"{url}/v1", "routers": (policy,)})
            result = run_online(one, requests)
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        if report is None:
            report = result
        else:
            report["policies"].update(result["policies"])
            report["runtime"]["policies_s"].update(result["runtime"]["policies_s"])
    assert report is not None
    report["config"]["routers"] = list(config.routers)
    return report
