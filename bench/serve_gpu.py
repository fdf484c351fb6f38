"""Online on one GPU: ``strata serve`` with one worker under closed-loop streams (issue 13).

    python -m bench.serve_gpu [--concurrency 64] [--num-requests 128] [--prompt-tokens 1024]
                              [--output-tokens 256] [--out DIR] [--tiny]

The worker loads a Llama-3-8B-shaped checkpoint directory with no weights (``--load-format
dummy``: seeded random bfloat16 weights made on the GPU; ``bench.disagg_gpu.make_model_dir``).
``python -m serving.frontend`` (= ``strata serve``) starts it behind the frontend (kv router);
``bench.serve`` then keeps ``--concurrency`` streaming ``/v1/completions`` requests in flight
(every prompt ``--prompt-tokens`` unique token ids, ``max_tokens`` = ``--output-tokens``,
``ignore_eos``) until ``--num-requests`` were sent. Reported: output tokens/s over the run,
TTFT and inter-token latency (ITL) p50/p90/p99 as the client saw them; ``DIR/run.json`` and
``DIR/report.html`` as ``strata bench serve`` writes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, print_table
from bench.disagg_gpu import LLAMA3_8B_CONFIG, TINY_CONFIG, make_model_dir
from bench.serve import ServeBenchConfig, run_serve_bench
from serving.netutil import free_port, wait_healthy


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=8192, help="KV blocks of the worker")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve-gpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="strata-serve-gpu-"))
    model_config = TINY_CONFIG if args.tiny else LLAMA3_8B_CONFIG
    model_dir = make_model_dir(work, model_config)
    port = free_port()
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "serving.frontend", "--model", str(model_dir),
        "--workers", "1", "--port", str(port), "--log-level", "warning",
        "--log-dir", str(args.out / "logs"), f"--worker-device={args.device}",
        "--worker-arg=--load-format=dummy", f"--worker-arg=--dtype={args.dtype}",
        f"--worker-arg=--max-num-seqs={args.max_num_seqs}",
        f"--worker-arg=--num-blocks={args.num_blocks}",
        f"--worker-arg=--max-model-len={args.prompt_tokens + args.output_tokens + 64}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=(args.out / "serve.log").open("w"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600)
        workers = httpx.get(f"{url}/admin/workers").json()["workers"]
        print(f"up: {len(workers)} worker(s); warming up", flush=True)
        common = dict(url=f"{url}/v1", synthetic=True, vocab_size=model_config["vocab_size"])
        warm = ServeBenchConfig(
            **common, out=work / "warm", concurrency=8, num_requests=8,
            prompt_tokens=args.prompt_tokens, output_tokens=8, seed=1,
        )  # fmt: skip
        run_serve_bench(warm)
        config = ServeBenchConfig(
            **common, out=args.out, concurrency=args.concurrency, num_requests=args.num_requests,
            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
            label="serve-gpu", seed=2,
        )  # fmt: skip
        run = run_serve_bench(config)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    summary = run["summary"]
    ms = lambda s: s * 1e3  # noqa: E731
    print_table(
        f"strata serve, one worker on {args.device}: {args.concurrency} streams, "
        f"{args.prompt_tokens}-token prompts, {args.output_tokens} output tokens",
        ["completed", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
        [[
            f"{summary['requests']['completed']}/{summary['requests']['total']}",
            summary["throughput_tok_s"], ms(summary["ttft_s"]["p50"]),
            ms(summary["ttft_s"]["p99"]), ms(summary["itl_s"]["p50"]), ms(summary["itl_s"]["p99"]),
        ]],
    )  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
