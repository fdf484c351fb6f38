"""Frontend overhead: the same requests straight to a worker and through the frontend.

    .venv/bin/python -m bench.frontend [--requests 300] [--concurrency 1] [--prompt-tokens 512]

Starts one mock worker process (``--speedup 1000``: the engine's modelled time is ~0) and the
frontend in another process (``strata serve --worker-url``, kv router), then sends the same
non-streaming token-id completions (``max_tokens=1``) alternately to the worker and to the
frontend, so both see the same machine noise. The overhead is the difference of the two latency
distributions at p50/p99 (tokenization excluded: prompts are token ids; routing, hashing the
prompt, KV-index lookup and the extra HTTP hop included). Prints a table and writes
``bench/results/frontend.json``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import RESULTS_DIR, percentile
from serving.netutil import free_port, wait_healthy

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_model_dir() -> Path:
    return REPO_ROOT / ".strata" / "test-cache" / "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "frontend.json")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(
            f"--model {args.model}: no checkpoint (run the tests once, or strata model import)"
        )

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    worker_port, kv_port, front_port = free_port(), free_port(), free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "serving.worker", "--model", str(args.model), "--engine", "mock",
         "--speedup", "1000", "--port", str(worker_port), "--kv-events-port", str(kv_port),
         "--served-model-name", "m", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    worker_url = f"http://127.0.0.1:{worker_port}"
    frontend = None
    try:
        wait_healthy(worker_url, worker)
        frontend = subprocess.Popen(
            [sys.executable, "-m", "workflows.cli", "serve", "--model", str(args.model),
             "--workers", "0", "--worker-url", worker_url, "--served-model-name", "m",
             "--port", str(front_port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        front_url = f"http://127.0.0.1:{front_port}"
        wait_healthy(front_url, frontend)
        results = measure(worker_url, front_url, args.requests, args.prompt_tokens)
    finally:
        for proc in (frontend, worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    report(results, args.out)


def measure(worker_url: str, front_url: str, num_requests: int, prompt_tokens: int) -> dict:
    direct_s: list[float] = []
    routed_s: list[float] = []
    with httpx.Client(timeout=60) as client:
        for i in range(num_requests + 20):
            # Distinct prompts (no cache effects differ between the two paths) of equal length.
            prompt = [(i * 7919 + j) % 40_000 + 10 for j in range(prompt_tokens)]
            body = {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            for url, sink in ((worker_url, direct_s), (front_url, routed_s)):
                started = time.perf_counter()
                response = client.post(f"{url}/v1/completions", json=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if i >= 20:  # warm-up
                    sink.append(elapsed)
    out = {}
    for name, values in (("direct", direct_s), ("frontend", routed_s)):
        out[name] = {q: percentile(values, q) * 1000 for q in (50, 90, 99)}
    out["overhead_ms"] = {q: out["frontend"][q] - out["direct"][q] for q in (50, 90, 99)}
    out["ratio"] = {q: out["frontend"][q] / out["direct"][q] for q in (50, 90, 99)}
    out["requests"] = num_requests
    out["prompt_tokens"] = prompt_tokens
    return out


def report(results: dict, out: Path) -> None:
    import json
    import platform

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"frontend overhead, {results['requests']} requests of "
                  f"{results['prompt_tokens']} prompt tokens, max_tokens=1")  # fmt: skip
    for column in ("", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for name in ("direct", "frontend", "overhead_ms", "ratio"):
        row = results[name]
        fmt = "{:.2f}x" if name == "ratio" else "{:.2f}"
        table.add_row(name, *(fmt.format(row[q]) for q in (50, 90, 99)))
    Console().print(table)
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
