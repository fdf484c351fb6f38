"""The frontend's data path, this tree against a baseline commit, on the same workers.

``python -m bench.frontend_path --model DIR [--baseline REF]``: two zero-delay mock workers
(``--speedup 1e6``, this tree) and two frontends over them, one from this tree and one from
``REF`` (``git archive`` into a temporary directory, run from there). The same load generator,
in this process, runs each workload against the two frontends alternately (A B A B, ``--rounds``
times): streaming chat at a fixed concurrency with fixed input/output lengths (``light``:
16 x 256 in / 16 out; ``heavy``: 64 x 1,024 in / 64 out, the workloads of issue 14). Per run:
requests/s, TTFT p50/p99, mean ITL, and the CPU-seconds the frontend and the workers spent per
1,000 requests (``psutil``, startup excluded). The result is the ratio this tree / baseline of
the medians, so a shared, loaded machine affects both sides alike; still say the load
(``uptime``) with the figures.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from serving.netutil import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"light": (16, 256, 16), "heavy": (64, 1024, 64)}  # concurrency, ISL, OSL
SERVED = "bench-model"
WORDS = (
    "the of and to in is was for on that with as by at from it be are this or an which have has "
    "not but were had one all their can more other time system model data cache token server"
)


@dataclass(slots=True)
class RunResult:
    side: str
    workload: str
    num_requests: int
    num_errors: int
    elapsed_s: float
    req_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_mean: float
    frontend_cpu_s_per_1k: float
    workers_cpu_s_per_1k: float


def start(
    cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def start_worker(model: Path, tmp: Path, i: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "serving.worker", "--model", str(model), "--engine", "mock",
           "--speedup", "1000000", "--port", str(port), "--served-model-name", SERVED,
           "--max-num-seqs", "256", "--log-level", "warning"]  # fmt: skip
    proc = start(cmd, tmp / f"worker-{i}.log", ROOT)
    return proc, f"http://127.0.0.1:{port}"


def start_frontend(model: Path, tree: Path, workers: list[str], log: Path, extra: list[str],
                   extra_path: str = "") -> tuple[subprocess.Popen, str]:  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "serving.frontend", "--model", str(model),
           "--served-model-name", SERVED, "--workers", "0", "--router", "kv",
           "--port", str(port), "--log-level", "warning", *extra]  # fmt: skip
    for url in workers:
        cmd += ["--worker-url", url]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), extra_path) if p)}
    return start(cmd, log, tree, env), f"http://127.0.0.1:{port}"


def extract_baseline(ref: str, into: Path) -> Path:
    """``serving/`` at ``ref``, laid out to run with ``python -m serving.frontend``."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "serving"], cwd=ROOT,
                             check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def make_prompts(model: Path, isl: int, count: int, seed: int) -> list[str]:
    """Random common words, ``isl`` tokens each with the chat template's (within a few)."""
    from serving.engine.factory import load_tokenizer

    tokenizer = load_tokenizer(model)
    rng = random.Random(seed)
    words = WORDS.split()
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(isl))
        ids = tokenizer.encode(text, add_special_tokens=False)[: max(isl - 12, 1)]
        prompts.append(tokenizer.decode(ids))
    return prompts


async def one(
    http: aiohttp.ClientSession, url: str, prompt: str, osl: int
) -> tuple[float, list[float], bool]:
    body = {"model": SERVED, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": osl, "ignore_eos": True, "stream": True}  # fmt: skip
    sent = time.perf_counter()
    arrivals: list[float] = []
    ok = False
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return 0.0, [], False
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                ok = True
            elif line.startswith(b"data: ") and b'"content":"' in line:
                arrivals.append(time.perf_counter())
    if not arrivals:
        return 0.0, [], False
    return arrivals[0] - sent, [b - a for a, b in itertools.pairwise(arrivals)], ok


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
    return total


async def run_load(
    url: str, prompts: list[str], conc: int, osl: int
) -> tuple[float, list[float], list[float], int]:
    queue = list(reversed(prompts))
    ttfts: list[float] = []
    itls: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=conc * 2)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def loop() -> None:
            nonlocal errors
            while queue:
                prompt = queue.pop()
                try:
                    ttft, gaps, ok = await one(http, url, prompt, osl)
                except aiohttp.ClientError:
                    ttft, gaps, ok = 0.0, [], False
                if ok:
                    ttfts.append(ttft)
                    itls.extend(gaps)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(conc)))
        return time.perf_counter() - t0, ttfts, itls, errors


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(side: str, workload: str, url: str, frontend: psutil.Process,
            workers: list[psutil.Process], prompts: list[str]) -> RunResult:  # fmt: skip
    conc, _, osl = WORKLOADS[workload]
    asyncio.run(run_load(url, prompts[: conc * 2], conc, osl))  # warm-up
    f0, w0 = cpu_s([frontend]), cpu_s(workers)
    elapsed, ttfts, itls, errors = asyncio.run(run_load(url, prompts, conc, osl))
    f1, w1 = cpu_s([frontend]), cpu_s(workers)
    n = len(prompts)
    return RunResult(side, workload, n, errors, round(elapsed, 2), round(len(ttfts) / elapsed, 2),
                     round(1000 * pct(ttfts, 0.5), 1), round(1000 * pct(ttfts, 0.99), 1),
                     round(1000 * statistics.fmean(itls), 2) if itls else float("nan"),
                     round(1000 * (f1 - f0) / n, 1), round(1000 * (w1 - w0) / n, 1))  # fmt: skip


def summarize(results: list[RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workload in sorted({r.workload for r in results}):
        med: dict[str, dict[str, float]] = {}
        for side in ("baseline", "this"):
            mine = [r for r in results if r.workload == workload and r.side == side]
            med[side] = {k: statistics.median(getattr(r, k) for r in mine)
                         for k in ("req_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_mean",
                                   "frontend_cpu_s_per_1k", "workers_cpu_s_per_1k")}  # fmt: skip
        out[workload] = {"median": med, "ratio_this_over_baseline": {
            k: round(med["this"][k] / med["baseline"][k], 3) if med["baseline"][k] else None
            for k in med["this"]}}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint dir (tokenizer)")
    parser.add_argument("--baseline", default="HEAD", help="git ref of the baseline frontend")
    parser.add_argument("--workloads", default="light,heavy")
    parser.add_argument("--requests", type=int, default=0, help="per run (default 25 x conc)")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs per workload")
    parser.add_argument("--frontend-arg", action="append", default=[],
                        help="extra flag for both frontends")  # fmt: skip
    parser.add_argument("--this-path", default="",
                        help="more PYTHONPATH for this tree's frontend only "
                        "(e.g. a --target install of uvloop and httptools)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/frontend_path.json"))
    args = parser.parse_args()
    model = args.model.absolute()
    procs: list[subprocess.Popen] = []
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="strata-fpath-") as tmp_name:
        tmp = Path(tmp_name)
        base_tree = extract_baseline(args.baseline, tmp / "baseline")
        try:
            workers = [start_worker(model, tmp, i) for i in range(2)]
            procs += [p for p, _ in workers]
            for proc, url in workers:
                wait_healthy(url, proc, timeout_s=900)
            urls = [u for _, u in workers]
            sides = {}
            for side, tree in (("baseline", base_tree), ("this", ROOT)):
                extra_path = args.this_path if side == "this" else ""
                proc, url = start_frontend(model, tree, urls, tmp / f"frontend-{side}.log",
                                           args.frontend_arg, extra_path)  # fmt: skip
                procs.append(proc)
                wait_healthy(url, proc, timeout_s=900)
                sides[side] = (psutil.Process(proc.pid), url)
            worker_ps = [psutil.Process(p.pid) for p, _ in workers]
            for workload in args.workloads.split(","):
                conc, isl, _ = WORKLOADS[workload]
                prompts = make_prompts(model, isl, args.requests or 25 * conc, seed=1)
                for i in range(args.rounds):
                    for side in ("baseline", "this") if i % 2 == 0 else ("this", "baseline"):
                        proc, url = sides[side]
                        result = measure(side, workload, url, proc, worker_ps, prompts)
                        results.append(result)
                        print(result, f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
    summary = summarize(results)
    report = {"machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
              "this_path": args.this_path,
              "baseline": subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT,
                                         capture_output=True, text=True).stdout.strip(),
              "summary": summary, "runs": [asdict(r) for r in results]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    cols = ("req_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_mean", "frontend_cpu_s_per_1k",
            "workers_cpu_s_per_1k")  # fmt: skip
    print(f"{'workload':8s} {'side':9s} " + " ".join(f"{c:>22s}" for c in cols))
    for workload, entry in summary.items():
        for side in ("baseline", "this"):
            print(f"{workload:8s} {side:9s} "
                  + " ".join(f"{entry['median'][side][c]:22.2f}" for c in cols))  # fmt: skip
        ratio = entry["ratio_this_over_baseline"]
        print(f"{workload:8s} {'ratio':9s} " + " ".join(f"{ratio[c]:22.3f}" for c in cols))
    print(report["machine"], f"baseline {report['baseline']}; wrote {args.out}")


if __name__ == "__main__":
    main()
