"""Soak and overload runs of ``strata serve`` with mock workers (not timed tests: a report).

``python -m bench.soak --model DIR`` (soak): ``strata serve`` with N mock workers, admission
limited to the workers' batch slots; a closed-loop calibration measures the pool's capacity
(requests/s); then an open-loop Poisson load at ``--load`` (1.5) times that capacity for
``--duration-s`` (600), a worker SIGKILLed every ``--kill-every-s`` (60; the supervisor restarts
it and the frontend takes it back). Per minute: requests sent, completed, rejected (429), failed,
p99 latency of completed ones, frontend and worker memory (RSS). The baseline is the first
minute after warm-up, in the same run: memory growth is reported as a ratio to it.

``--overload`` runs ``--load 3`` without kills, plus an API key limited to ``--key-rpm``
requests per minute that sends at three times that rate: the 429 latency (p50/p99), admitted
requests within their SLA (end-to-end latency under twice the calibration p99), and the key's
admitted requests per 60 s window against its limit.

Writes JSON (``--out``) and prints a table. Figures from a shared 2-core machine are noisy: say
the load (``uptime``) with them, as the report does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil

from serving.frontend.auth import hash_key
from serving.netutil import free_port, wait_healthy

KEY = "sk-soak-limited"


@dataclass(slots=True)
class Outcome:
    sent_s: float
    status: int  # HTTP status; 0: the connection failed
    latency_s: float  # to the last byte (or to the error / 429)
    failed: bool = False  # admitted (200) but the stream broke, or a non-429 error
    keyed: bool = False
    error: str = ""  # why it failed: the error event, the cut stream's tail, the exception
    lag_s: float = 0.0  # how late the generator sent it after its scheduled arrival


@dataclass(slots=True)
class Sample:
    at_s: float
    frontend_rss_mb: float
    workers_rss_mb: float
    num_workers: int
    frontend_cpu_percent: float  # of one core, since the previous sample


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)


def start_serve(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    keys = workdir / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: limited, sha256: {hash_key(KEY)}, "
                    f"requests_per_minute: {args.key_rpm}}}\n")  # fmt: skip
    cmd = [sys.executable, "-m", "serving.frontend", "--model", str(args.model),
           "--engine", "mock", "--workers", str(args.workers), "--port", str(port),
           f"--worker-arg=--speedup={args.speedup}",
           f"--worker-arg=--max-num-seqs={args.slots_per_worker}",
           "--max-inflight-requests", str(args.workers * args.slots_per_worker),
           "--log-dir", str(workdir / "logs"), "--log-level", "warning",
           "--keys-file", str(keys), "--api-key", "sk-soak"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=(workdir / "serve.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout_s=args.startup_timeout_s)
    return proc, url


def worker_procs(serve: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(serve.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "serving.worker" in " ".join(child.cmdline()):
                out.append(child)
    return out


async def one_request(http: httpx.AsyncClient, args: argparse.Namespace, t0: float,
                      keyed: bool, run: Run, due_s: float | None = None) -> None:  # fmt: skip
    """One streamed completion; ``due_s``: its scheduled arrival (seconds after ``t0``)."""
    sent = time.perf_counter()
    prompt = [random.randrange(1000, 40000) for _ in range(args.prompt_tokens)]
    body = msgspec.json.encode({"model": args.model.name, "prompt": prompt,
                                "max_tokens": args.output_tokens, "ignore_eos": True,
                                "stream": True})  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY if keyed else 'sk-soak'}",
               "Content-Type": "application/json"}  # fmt: skip
    status, failed, error = 0, False, ""
    try:
        async with http.stream("POST", "/v1/completions", content=body,
                               headers=headers) as resp:  # fmt: skip
            status = resp.status_code
            text = (await resp.aread()).decode(errors="replace")
            if status == 200:
                # An error event (not a token whose text is "error"), or a cut stream.
                failed = 'data: {"error"' in text or not text.rstrip().endswith("data: [DONE]")
            else:
                failed = status != 429
            if failed:
                error = text[-300:]
    except httpx.HTTPError as exc:
        failed, error = True, f"{type(exc).__name__}: {exc}"
    lag_s = sent - t0 - due_s if due_s is not None else 0.0
    run.outcomes.append(Outcome(sent - t0, status, time.perf_counter() - sent, failed, keyed,
                                error, lag_s))  # fmt: skip


async def calibrate(url: str, args: argparse.Namespace) -> tuple[float, float]:
    """Closed loop at the admission limit for ``--calibrate-s``: (requests/s, p99 latency s)."""
    run = Run()
    concurrency = args.workers * args.slots_per_worker
    deadline = time.perf_counter() + args.calibrate_s
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        t0 = time.perf_counter()

        async def loop() -> None:
            while time.perf_counter() < deadline:
                await one_request(http, args, t0, False, run)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    done = sorted(o.latency_s for o in run.outcomes if o.status == 200 and not o.failed)
    if not done:
        raise RuntimeError("calibration completed no request")
    return len(done) / elapsed, percentile(done, 0.99)


async def open_loop(url: str, rate: float, args: argparse.Namespace, run: Run,
                    serve: subprocess.Popen, *, keyed: bool = False,
                    duration_s: float) -> None:  # fmt: skip
    """Poisson arrivals at ``rate`` (from the limited key when ``keyed``) for ``duration_s``;
    kills and memory samples beside them."""
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=500)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        end = t0 + duration_s
        tasks: set[asyncio.Task] = set()

        async def arrivals(per_s: float) -> None:
            next_at = t0
            while per_s > 0:
                next_at += random.expovariate(per_s)
                if next_at >= end:
                    return
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                due_s = next_at - t0
                task = asyncio.create_task(one_request(http, args, t0, keyed, run, due_s))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def kills() -> None:
            if not args.kill_every_s:
                return
            while time.perf_counter() + args.kill_every_s < end:
                await asyncio.sleep(args.kill_every_s)
                procs = sorted(worker_procs(serve), key=lambda p: p.create_time())
                if procs:  # the worker up the longest (a restarted one may still load)
                    with contextlib.suppress(psutil.Error):
                        procs[0].send_signal(signal.SIGKILL)
                        run.kills.append(time.perf_counter() - t0)

        async def sample() -> None:
            while time.perf_counter() < end:
                run.samples.append(measure(serve, time.perf_counter() - t0))
                await asyncio.sleep(args.sample_every_s)

        await asyncio.gather(arrivals(rate), kills(), sample())
        if tasks:
            await asyncio.wait(tasks, timeout=args.drain_s)


def measure(serve: subprocess.Popen, at_s: float) -> Sample:
    proc = _frontend_proc(serve)
    frontend = proc.memory_info().rss
    cpu = proc.cpu_percent(None)
    workers = [p for p in worker_procs(serve) if p.is_running()]
    rss = 0
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            rss += proc.memory_info().rss
    return Sample(at_s, frontend / 2**20, rss / 2**20, len(workers), cpu)


_PROCS: dict[int, psutil.Process] = {}


def _frontend_proc(serve: subprocess.Popen) -> psutil.Process:
    """One ``psutil.Process`` per pid, so ``cpu_percent`` measures between samples."""
    return _PROCS.setdefault(serve.pid, psutil.Process(serve.pid))


def server_rejection_latency(url: str) -> dict[str, Any]:
    """The frontend's own arrival-to-429 histogram: count, share under 50 ms, p99 bucket."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "strata_frontend_rejection_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    total = buckets.get(math.inf, 0.0)
    if not total:
        return {"count": 0}
    p99 = next(le for le in sorted(buckets) if buckets[le] >= 0.99 * total)
    return {"count": int(total), "share_within_50ms": round(buckets[0.05] / total, 4),
            "p99_bucket_le_s": p99}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def per_minute(run: Run, duration_s: float) -> list[dict[str, Any]]:
    rows = []
    for minute in range(math.ceil(duration_s / 60)):
        lo, hi = minute * 60, (minute + 1) * 60
        mine = [o for o in run.outcomes if lo <= o.sent_s < hi]
        done = [o.latency_s for o in mine if o.status == 200 and not o.failed]
        samples = [s for s in run.samples if lo <= s.at_s < hi]
        rows.append({
            "minute": minute + 1,
            "sent": len(mine),
            "completed": len(done),
            "rejected_429": sum(o.status == 429 for o in mine),
            "failed": sum(o.failed for o in mine),
            "p99_latency_s": round(percentile(done, 0.99), 3),
            "frontend_rss_mb": round(max((s.frontend_rss_mb for s in samples), default=0), 1),
            "frontend_cpu_percent": round(
                sum(s.frontend_cpu_percent for s in samples) / max(1, len(samples)), 1),
            "workers_rss_mb": round(max((s.workers_rss_mb for s in samples), default=0), 1),
            "kills": sum(lo <= k < hi for k in run.kills),
        })  # fmt: skip
    return rows


def summarize(run: Run, args: argparse.Namespace, capacity: float, calib_p99: float,
              rows: list[dict[str, Any]], key_run: Run | None) -> dict[str, Any]:  # fmt: skip
    admitted = [o for o in run.outcomes if o.status == 200 or (o.status != 429 and o.failed)]
    rejected = [o.latency_s for o in run.outcomes if o.status == 429]
    done = [o for o in run.outcomes if o.status == 200 and not o.failed]
    warm = rows[args.warmup_min :] if len(rows) > args.warmup_min else rows
    base = warm[0]["frontend_rss_mb"] if warm else math.nan
    sla_s = 2 * calib_p99
    out: dict[str, Any] = {
        "mode": "overload" if args.overload else "soak",
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "workers": args.workers, "slots_per_worker": args.slots_per_worker,
        "capacity_req_per_s": round(capacity, 2), "offered_load": args.load,
        "sent": len(run.outcomes), "completed": len(done), "rejected_429": len(rejected),
        # The generator's own lateness: a Poisson schedule at the asked rate, each request
        # sent when its task runs (a busy client falls behind and offers less than asked).
        "asked_req_per_s": round(args.load * capacity, 2),
        "sending_span_s": round(max((o.sent_s for o in run.outcomes), default=0.0), 1),
        "sent_req_per_s": round(len(run.outcomes) / max(
            max((o.sent_s for o in run.outcomes), default=0.0), 1e-9), 2),
        "generator_lag_ms_p50": round(1000 * percentile([o.lag_s for o in run.outcomes], 0.5), 1),
        "generator_lag_ms_p99": round(1000 * percentile([o.lag_s for o in run.outcomes], 0.99), 1),
        "failed": sum(o.failed for o in run.outcomes),
        "failed_among_admitted": sum(o.failed for o in admitted),
        "kills": len(run.kills),
        "failure_reasons": dict(collections.Counter(o.error[:120] for o in run.outcomes
                                                    if o.failed).most_common(5)),
        "rejected_latency_ms_p50": round(1000 * percentile(rejected, 0.5), 1),
        "rejected_latency_ms_p99": round(1000 * percentile(rejected, 0.99), 1),
        "sla_e2e_s": round(sla_s, 3),
        "admitted_within_sla": round(sum(o.latency_s <= sla_s for o in done) / len(done), 4)
        if done else None,
        "frontend_rss_growth_after_warmup": round(
            max(r["frontend_rss_mb"] for r in warm) / base - 1, 4) if warm else None,
        "per_minute": rows,
    }  # fmt: skip
    if key_run is not None:  # the key alone at 3x its limit, the model below capacity
        keyed = key_run.outcomes
        out["key_rpm_limit"] = args.key_rpm
        out["key_offered_per_minute"] = round(3 * args.key_rpm)
        out["key_admitted_per_minute"] = [
            sum(o.status == 200 and lo <= o.sent_s < lo + 60 for o in keyed)
            for lo in range(0, int(args.key_phase_s) - 59, 60)
        ]
        out["key_failed"] = sum(o.failed for o in keyed)
    return out


def print_table(result: dict[str, Any]) -> None:
    cols = ["minute", "sent", "completed", "rejected_429", "failed", "p99_latency_s",
            "frontend_rss_mb", "frontend_cpu_percent", "workers_rss_mb", "kills"]  # fmt: skip
    print(" ".join(f"{c.replace('_', ' '):>12.12s}" for c in cols))
    for row in result["per_minute"]:
        print(" ".join(f"{row[c]!s:>12s}" for c in cols))
    for key, value in result.items():
        if key not in ("per_minute", "outcomes", "samples"):
            print(f"{key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint dir (tokenizer)")
    parser.add_argument("--overload", action="store_true")
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--load", type=float, default=None, help="x capacity (1.5, overload 3)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--slots-per-worker", type=int, default=4, help="worker --max-num-seqs")
    parser.add_argument("--speedup", type=float, default=0.25, help="mock: 24 ms decode steps")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--kill-every-s", type=float, default=None)
    parser.add_argument("--key-rpm", type=int, default=120)
    parser.add_argument("--key-phase-s", type=float, default=120.0, help="overload only")
    parser.add_argument("--calibrate-s", type=float, default=30.0)
    parser.add_argument("--sample-every-s", type=float, default=5.0)
    parser.add_argument("--warmup-min", type=int, default=1)
    parser.add_argument("--drain-s", type=float, default=120.0)
    parser.add_argument("--startup-timeout-s", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep strata serve's and the workers' logs here")  # fmt: skip
    args = parser.parse_args()
    args.model = args.model.absolute()
    args.duration_s = args.duration_s or (120.0 if args.overload else 600.0)
    args.load = args.load or (3.0 if args.overload else 1.5)
    if args.kill_every_s is None:
        args.kill_every_s = 0.0 if args.overload else 60.0
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="strata-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        serve, url = start_serve(args, workdir)
        try:
            capacity, calib_p99 = asyncio.run(calibrate(url, args))
            print(f"capacity {capacity:.2f} req/s, calibration p99 {calib_p99:.2f} s", flush=True)
            run, key_run = Run(), None
            asyncio.run(open_loop(url, args.load * capacity, args, run, serve,
                                  duration_s=args.duration_s))  # fmt: skip
            rejection = server_rejection_latency(url)
            if args.overload:
                key_run = Run()
                asyncio.run(open_loop(url, 3 * args.key_rpm / 60, args, key_run, serve,
                                      keyed=True, duration_s=args.key_phase_s))  # fmt: skip
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, signal.SIGKILL)
    rows = per_minute(run, args.duration_s)
    result = summarize(run, args, capacity, calib_p99, rows, key_run)
    result["server_rejection_latency"] = rejection
    result["outcomes"] = [asdict(o) for o in run.outcomes]
    result["samples"] = [asdict(s) for s in run.samples]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
