"""Disaggregated vs aggregated serving on GPUs, online (issue 5, acceptance 6).

    python -m bench.disagg_gpu [--duration 60] [--layouts agg2,p1d1] [--out FILE]

Builds a Llama-3-8B-shaped checkpoint *directory* with no weights (``config.json`` and a
word-level tokenizer over the 128,256 ids); workers load it with ``--load-format dummy``
(seeded random bfloat16 weights made on their GPU). For each layout it starts ``python -m
serving.frontend`` (= ``strata serve``) with one worker per GPU — ``agg2``: two aggregated
workers; ``p1d1``: one prefill and one decode worker — and replays the same mixed open-loop
workload through the frontend with ``bench.load``:

* chat streams: a shared 448-token system prompt + 64 unique tokens, 256 output tokens,
  Poisson arrivals at ``--chat-rate``; under the default rule (uncached < 2,048 tokens and
  < 70% of the prompt) the decode worker prefills these itself once the prefix is cached;
* long documents: ``--long-tokens`` unique tokens, 32 output tokens, at ``--long-rate``: these
  go to the prefill worker and their KV is pulled by the decode worker (NIXL, CUDA IPC).

Reported per layout: TTFT p50/p99 (all, and long documents alone), ITL p50/p99, output
throughput, the frontend's disaggregation decisions and the decode worker's pulled bytes and
pull time (the GPU-to-GPU KV transfer rate as serving saw it). Ratios against ``agg2`` from
the same run. Needs CUDA and NIXL; prints the KV transport each worker chose.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import RESULTS_DIR, machine_info, print_table, write_json
from bench.engine import LLAMA3_8B_SHAPE
from bench.load import StreamResult, replay_online, summarize
from bench.trace import PromptBuilder, TraceRequest
from serving.netutil import free_port, wait_healthy

BLOCK = 16
LAYOUTS: dict[str, list[str]] = {
    "agg2": ["--workers", "2"],
    "p1d1": ["--prefill", "1", "--decode", "1"],
}
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "torch_dtype": "bfloat16",
    **LLAMA3_8B_SHAPE,
    "max_position_embeddings": 16_384,  # the workers' context; the KV pool sets the rest
}
TINY_CONFIG = {  # --tiny: a CPU smoke test of the script itself
    **LLAMA3_8B_CONFIG, "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def make_model_dir(root: Path, config: dict[str, Any]) -> Path:
    """config.json + a word-level tokenizer covering every id (decodes any output)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = root / "random-llama3-8b"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{config['eos_token_id']}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos)
    fast.save_pretrained(model_dir)
    return model_dir


def mixed_workload(
    *,
    duration_s: float,
    chat_rate: float,
    long_rate: float,
    long_tokens: int,
    seed: int,
) -> list[TraceRequest]:
    """Chat streams sharing a system prompt, with long unique documents among them."""
    rng = random.Random(seed)
    system_blocks = tuple(range(1, 448 // BLOCK + 1))  # hash ids shared by every chat
    events: list[tuple[float, str]] = []
    for kind, rate in (("chat", chat_rate), ("long", long_rate)):
        t = rng.expovariate(rate)
        while t < duration_s:
            events.append((t, kind))
            t += rng.expovariate(rate)
    events.sort()
    requests: list[TraceRequest] = []
    next_hash = 1_000_000
    for index, (arrival_s, kind) in enumerate(events):
        if kind == "chat":
            requests.append(TraceRequest(index, arrival_s, 512, 256, system_blocks))
        else:
            num_blocks = long_tokens // BLOCK
            hash_ids = tuple(range(next_hash, next_hash + num_blocks))
            next_hash += num_blocks
            requests.append(TraceRequest(index, arrival_s, long_tokens, 32, hash_ids))
    return requests


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` carrying every given label value (Prometheus text)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def _replay_with_progress(
    base_url: str,
    requests: Sequence[TraceRequest],
    prompts: PromptBuilder,
    args: argparse.Namespace,
    worker_urls: list[str],
) -> list[StreamResult]:
    """``bench.load.replay_online`` bounded by ``--drain``, with one line of the workers'
    state every 10 s (so a slow layout shows where it stands)."""

    async def progress() -> None:
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=5) as probe:
            while True:
                await asyncio.sleep(10)
                states = []
                for u in worker_urls:
                    text = (await probe.get(f"{u}/metrics")).text
                    states.append(
                        f"gen {_metric(text, 'vllm:generation_tokens_total'):.0f} "
                        f"run {_metric(text, 'vllm:num_requests_running'):.0f} "
                        f"wait {_metric(text, 'vllm:num_requests_waiting'):.0f}"
                    )
                elapsed_s = time.perf_counter() - started
                print(f"  t={elapsed_s:.0f}s | " + " | ".join(states), flush=True)

    monitor = asyncio.create_task(progress())
    try:
        return await replay_online(
            base_url, requests, prompts, timeout_s=args.request_timeout, drain_s=args.drain
        )
    finally:
        monitor.cancel()


def run_layout(
    layout: str, model_dir: Path, requests: Sequence[TraceRequest], args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    log_path = Path(args.log_dir) / f"serve-{layout}.log"
    cmd = [
        sys.executable, "-m", "serving.frontend", "--model", str(model_dir),
        *LAYOUTS[layout], "--port", str(port), "--log-level", "warning",
        "--log-dir", str(Path(args.log_dir) / layout),
        *[f"--worker-device={d}" for d in args.devices.split(",")],
        "--worker-arg=--load-format=dummy", f"--worker-arg=--dtype={args.dtype}",
        f"--worker-arg=--gpu-memory-utilization={args.gpu_memory_utilization}",
        f"--worker-arg=--max-num-seqs={args.max_num_seqs}",
        f"--worker-arg=--max-model-len={args.max_model_len}",
        f"--worker-arg=--num-blocks={args.num_blocks}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600)
        workers = httpx.get(f"{url}/admin/workers").json()["workers"]
        transports = {}
        for w in workers:
            health = httpx.get(f"{w['url']}/health").json()
            transports[w["worker_id"]] = (health.get("kv_transport") or {}).get("kind", "none")
        prompts = PromptBuilder(BLOCK, args.config["vocab_size"], seed=args.seed)
        warm = [TraceRequest(10_000 + i, i * 0.05, 600, 8, ()) for i in range(8)]
        asyncio.run(replay_online(f"{url}/v1", warm, prompts))
        print(f"[{layout}] up, transports {transports}; warm-up done", flush=True)
        before = {w["worker_id"]: httpx.get(f"{w['url']}/metrics").text for w in workers}
        frontend_before = httpx.get(f"{url}/metrics").text
        started = time.perf_counter()
        results = asyncio.run(
            _replay_with_progress(f"{url}/v1", requests, prompts, args, [w["url"] for w in workers])
        )
        wall_s = time.perf_counter() - started
        print(f"[{layout}] replay done in {wall_s:.1f} s", flush=True)
        frontend_metrics = httpx.get(f"{url}/metrics").text
        pulled_bytes = pull_s = 0.0
        for w in workers:
            after = httpx.get(f"{w['url']}/metrics").text
            pulled_bytes += _metric(after, "strata_kv_transfer_bytes_total") - _metric(
                before[w["worker_id"]], "strata_kv_transfer_bytes_total"
            )
            pull_s += _metric(after, "strata_kv_transfer_seconds_sum") - _metric(
                before[w["worker_id"]], "strata_kv_transfer_seconds_sum"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    report = summarize(results, layout)
    long_ids = {r.index for r in requests if r.output_length == 32}
    report["long_ttft_s"] = summarize(
        [r for r in results if r.index in long_ids], f"{layout}-long"
    )["ttft_s"]
    report["wall_s"] = wall_s
    report["transports"] = transports
    report["decisions"] = {  # the warm-up requests excluded
        d: _metric(frontend_metrics, "strata_router_disagg_decisions_total", decision=d)
        - _metric(frontend_before, "strata_router_disagg_decisions_total", decision=d)
        for d in ("remote", "local_short", "local_prefill_failed", "aggregated")
    }
    report["kv_pulled_bytes"] = pulled_bytes
    report["kv_pull_seconds"] = pull_s
    report["kv_pull_gb_s"] = pulled_bytes / pull_s / 1e9 if pull_s else None
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="agg2,p1d1")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--chat-rate", type=float, default=3.0, help="chat streams per second")
    parser.add_argument("--long-rate", type=float, default=0.3, help="long documents per second")
    parser.add_argument("--long-tokens", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--num-blocks", type=int, default=8192, help="KV blocks per worker")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--drain", type=float, default=90.0, help="seconds after the last arrival to wait"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="per request (s): an overload "
        "shows as failed requests instead of a run that never ends",
    )
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="one per worker, in order")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "disagg-gpu.json")
    args = parser.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",")]
    for name in layouts:
        if name not in LAYOUTS:
            parser.error(f"unknown layout {name!r}: expected {', '.join(LAYOUTS)}")
    work = Path(tempfile.mkdtemp(prefix="strata-disagg-gpu-"))
    args.log_dir = args.log_dir or str(work)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    args.config = TINY_CONFIG if args.tiny else LLAMA3_8B_CONFIG
    try:
        model_dir = make_model_dir(work, args.config)
        requests = mixed_workload(
            duration_s=args.duration,
            chat_rate=args.chat_rate,
            long_rate=args.long_rate,
            long_tokens=args.long_tokens,
            seed=args.seed,
        )
        reports = {name: run_layout(name, model_dir, requests, args) for name in layouts}
    finally:
        shutil.rmtree(work / "random-llama3-8b", ignore_errors=True)
    base = reports.get("agg2")
    rows = []
    for name, r in reports.items():
        ratio = (
            f"{r['itl_s']['p99'] / base['itl_s']['p99']:.2f}x"
            if base and base["itl_s"]["p99"]
            else "-"
        )
        rows.append(
            [
                name,
                f"{r['requests']['completed']}/{r['requests']['total']}",
                f"{r['ttft_s']['p50'] * 1e3:.0f} / {r['ttft_s']['p99'] * 1e3:.0f}",
                f"{r['long_ttft_s']['p50'] * 1e3:.0f} / {r['long_ttft_s']['p99'] * 1e3:.0f}",
                f"{r['itl_s']['p50'] * 1e3:.1f} / {r['itl_s']['p99'] * 1e3:.1f}",
                ratio,
                f"{r['throughput_tok_s']:.0f}",
                f"{r['kv_pull_gb_s']:.1f}" if r["kv_pull_gb_s"] else "-",
                ", ".join(f"{k} {int(v)}" for k, v in r["decisions"].items() if v),
                ", ".join(sorted(set(r["transports"].values()))),
            ]
        )
    print_table(
        f"Disaggregation, {'tiny' if args.tiny else 'random Llama-3-8B'} {args.dtype} on "
        f"{args.devices} ({len(requests)} requests)",
        ["layout", "done", "TTFT p50/p99 ms", "long TTFT p50/p99 ms", "ITL p50/p99 ms",
         "ITL p99 vs agg2", "out tok/s", "KV pull GB/s", "decisions", "transport"],
        rows,
    )  # fmt: skip
    path = write_json(
        args.out,
        {
            "machine": machine_info(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "config")},
            "layouts": reports,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
