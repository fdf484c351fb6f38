"""Online step load through ``strata serve --planner`` with mock workers (acceptance 2).

    .venv/bin/python bench/planner_step.py --model DIR [--time-scale 1] [--out FILE]

The load: ``base_rate`` requests/s, a ramp to four times that over ``ramp_s``, held for
``hold_s``, a ramp back down over ``ramp_s``, then ``tail_s`` at the base rate (all times
multiplied by ``time_scale``; the test runs it compressed). Requests are open-loop streaming
completions (``bench.load``); every one must finish with all its tokens. Mock workers are made
slow (a timing profile: ``decode_ms`` per step, ``max_num_seqs`` sequences) so that a few
requests per second need several replicas; the planner's profile is measured from the same
mock in process (``strata profile``'s code). Replicas come from the planner's own series on the
frontend's ``/metrics``, sampled every two seconds.

Figures: replicas over time, scale events, errors and incomplete streams, TTFT/ITL percentiles
and SLA attainment, outside and inside the lead-time windows (from a scale-up decision until the
replica serves, where the SLA may break: that is the lead time). Writes JSON, prints a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.load import StreamResult, replay_online  # noqa: E402
from bench.trace import PromptBuilder, TraceRequest  # noqa: E402


@dataclass(frozen=True)
class StepLoad:
    base_rate: float = 0.3  # requests/s before and after the step
    multiplier: float = 4.0
    warmup_s: float = 10.0
    ramp_s: float = 30.0
    # Longer than a mock worker's start on this loaded 2-core machine (74-290 s measured), so
    # that the added replicas serve for a while before the load goes down.
    hold_s: float = 420.0
    tail_s: float = 240.0
    time_scale: float = 1.0  # every duration above is multiplied by this
    prompt_tokens: int = 64
    output_tokens: int = 8

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, start_s, end_s) in wall seconds."""
        k = self.time_scale
        bounds = [("warmup", self.warmup_s), ("ramp up", self.ramp_s), ("hold", self.hold_s),
                  ("ramp down", self.ramp_s), ("tail", self.tail_s)]  # fmt: skip
        out, t = [], 0.0
        for name, length in bounds:
            out.append((name, t, t + length * k))
            t += length * k
        return out

    def rate(self, t: float) -> float:
        (_, _, w), (_, _, up), (_, _, hold), (_, _, down), _ = self.phases()
        low, high = self.base_rate, self.base_rate * self.multiplier
        if t < w:
            return low
        if t < up:
            return low + (high - low) * (t - w) / (up - w)
        if t < hold:
            return high
        if t < down:
            return high - (high - low) * (t - hold) / (down - hold)
        return low

    def requests(self) -> list[TraceRequest]:
        """Arrivals at unit steps of the integrated rate (no randomness: reruns compare)."""
        end = self.phases()[-1][2]
        out, t, acc, dt = [], 0.0, 0.0, 0.01
        while t < end:
            acc += self.rate(t) * dt
            while acc >= 1.0:
                acc -= 1.0
                out.append(TraceRequest(len(out), t, self.prompt_tokens, self.output_tokens, ()))
            t += dt
        return out


@dataclass(frozen=True)
class MockWorkers:
    """Slow mock workers (two sequences, 250 ms a token: 2 s a request) so that about one
    request per second, and a handful of tokens per second for a starved CPU to stream, needs
    several replicas."""

    decode_ms: float = 250.0  # per step, whatever the batch
    prefill_ms: tuple[tuple[int, float], ...] = ((1, 12.0), (4096, 60.0))
    max_num_seqs: int = 2
    num_blocks: int = 2048
    max_replicas: int = 5
    ttft_sla_s: float = 2.0
    itl_sla_s: float = 0.5  # two decode steps: room for a starved CPU


@dataclass
class Sampler:
    """Polls the frontend's /metrics: the planner's replicas and desired replicas."""

    url: str
    model: str
    samples: list[dict[str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, started: float) -> None:
        with httpx.Client(timeout=5) as http:
            while not self.stop.wait(2.0):
                try:
                    text = http.get(f"{self.url}/metrics").text
                except httpx.HTTPError:
                    continue
                row = {"t": time.perf_counter() - started}
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.labels.get("model") == self.model and s.name in _SAMPLED:
                            key = _SAMPLED[s.name]
                            row[key] = row.get(key, 0.0) + s.value
                self.samples.append(row)


_SAMPLED = {
    "strata_planner_replicas": "ready",
    "strata_planner_replicas_starting": "starting",
    "strata_planner_replicas_draining": "draining",
    "strata_planner_desired_replicas": "desired",
    "strata_planner_lead_time_seconds": "lead_time_s",
}


def write_timing(directory: Path, mock: MockWorkers) -> None:
    """The mock workers' timing profile (``--timing-profile``)."""
    timing = {
        "prefill": [list(p) for p in mock.prefill_ms],
        "decode": {"coeffs_ms": [mock.decode_ms]},
    }
    (directory / "timing.json").write_text(json.dumps(timing))


def measure_worker_start(model_dir: Path, directory: Path, mock: MockWorkers) -> float:
    """Seconds from spawning one mock worker to its ``/health`` answering: the lead time the
    planner starts from (measured here, now, under this machine's load)."""
    from serving.netutil import free_port, wait_healthy

    port, kv_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "serving.worker", "--model", str(model_dir), "--engine", "mock",
        "--host", "127.0.0.1", "--port", str(port), "--kv-events-port", str(kv_port),
        f"--timing-profile={directory / 'timing.json'}", f"--max-num-seqs={mock.max_num_seqs}",
        f"--num-blocks={mock.num_blocks}",
    ]  # fmt: skip
    started = time.perf_counter()
    with (directory / "lead-time-worker.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
                                start_new_session=True)  # fmt: skip
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=300)
            return time.perf_counter() - started
        finally:
            stop(proc)


def write_setup(
    directory: Path, load: StepLoad, mock: MockWorkers, model: str, lead_time_s: float
) -> Path:
    """The planner's profile, measured from the mock in process, and the planner config."""
    from serving.engine.core import EngineCore
    from serving.engine.scheduler import SchedulerConfig
    from serving.engine.timing import MockModelRunner, TimingProfile
    from serving.planner.profiler import ProfilePlan, profile_engine

    timing = json.loads((directory / "timing.json").read_text())
    core = EngineCore(
        MockModelRunner(vocab_size=32_000, num_blocks=mock.num_blocks,
                        profile=TimingProfile.from_dict(timing)),
        SchedulerConfig(max_num_seqs=mock.max_num_seqs, max_num_batched_tokens=2048,
                        max_model_len=mock.num_blocks * 16),
        enable_prefix_caching=False,
    )  # fmt: skip
    plan = ProfilePlan((16, 128, 512, 2048), tuple(range(1, mock.max_num_seqs + 1)), (128, 1024))
    profile_engine(core, engine="mock", model=model, device="cpu", vocab_size=32_000,
                   plan=plan).save(directory / "profile.json")  # fmt: skip
    k = load.time_scale
    config = {
        "model": model,
        "profile": "profile.json",
        "sla": {"ttft_s": mock.ttft_sla_s, "itl_s": mock.itl_sla_s},
        "roles": {"both": {"min_replicas": 1, "max_replicas": mock.max_replicas,
                           # One worker's start measured before the run; the planner's own
                           # measurements of its scale-ups replace it.
                           "lead_time": {"node_provisioning_s": 0, "weights_s": lead_time_s,
                                         "warmup_s": 0}}},
        # Ticks every 2 s (each scrapes the frontend and every worker: CPU the stack lacks
        # here); rates over 20 s, Holt on 4 s buckets over two minutes.
        "predictor": {"kind": "holt", "bucket_s": max(1.0, 4 * k), "window_s": 120 * k},
        "scaling": {"interval_s": max(0.5, 2 * k), "model_interval_s": max(1.0, 4 * k),
                    "target_utilization": 0.8, "scale_down_stabilization_s": 30 * k,
                    "queue_per_replica_up": 2, "queue_ticks_up": 2},
        "metrics": {"window_s": max(5.0, 20 * k)},
        "connector": {"drain": {"deadline_s": 60, "poll_s": 0.5}},
    }  # fmt: skip
    path = directory / "planner.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_serve(
    model_dir: Path, directory: Path, config: Path, mock: MockWorkers
) -> tuple[subprocess.Popen, str]:
    from serving.netutil import free_port, wait_healthy

    port = free_port()
    cmd = [
        sys.executable, "-m", "workflows.cli", "serve", "--model", str(model_dir),
        "--engine", "mock", "--workers", "1", "--port", str(port), "--router", "least-loaded",
        "--planner-config", str(config), "--log-dir", str(directory / "logs"),
        "--log-level", "info",
        f"--worker-arg=--timing-profile={directory / 'timing.json'}",
        f"--worker-arg=--max-num-seqs={mock.max_num_seqs}",
        f"--worker-arg=--num-blocks={mock.num_blocks}",
    ]  # fmt: skip
    log = (directory / "serve.log").open("w")
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=900)  # minutes at a load of 25 on 2 cores
    except (RuntimeError, TimeoutError):
        stop(proc)
        raise RuntimeError(
            f"strata serve did not start:\n{(directory / 'serve.log').read_text()[-3000:]}"
        ) from None
    return proc, url


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (serve stops its workers), then SIGKILL to whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_step(model_dir: Path, directory: Path, load: StepLoad, mock: MockWorkers,
             settle_s: float = 240.0) -> dict[str, Any]:  # fmt: skip
    """Start the stack, send the step load, wait until the replicas are back to the minimum
    (at most ``settle_s`` after the load), stop; the figures as a dict."""
    model = Path(model_dir).name
    directory.mkdir(parents=True, exist_ok=True)
    write_timing(directory, mock)
    lead_time_s = measure_worker_start(Path(model_dir), directory, mock)
    config = write_setup(directory, load, mock, model, lead_time_s)
    proc, url = start_serve(Path(model_dir), directory, config, mock)
    sampler = Sampler(url, model)
    try:
        started = time.perf_counter()
        thread = threading.Thread(target=sampler.run, args=(started,), daemon=True)
        thread.start()
        requests = load.requests()
        prompts = PromptBuilder(16, 32_000, seed=1)
        results = asyncio.run(replay_online(f"{url}/v1", requests, prompts, timeout_s=120))
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:  # the scale-down after the load
            last = sampler.samples[-1] if sampler.samples else {}
            if last.get("ready", 0) + last.get("starting", 0) + last.get("draining", 0) <= 1:
                break
            time.sleep(0.5)
        workers = httpx.get(f"{url}/admin/workers", timeout=10).json()["workers"]
        sampler.stop.set()
        thread.join(5)
    finally:
        stop(proc)
    payload = figures(
        load, mock, results, sampler.samples, workers, (directory / "serve.log").read_text()
    )
    payload["worker_start_s"] = lead_time_s
    return payload


def figures(
    load: StepLoad,
    mock: MockWorkers,
    results: list[StreamResult],
    samples: list[dict[str, float]],
    workers: list[dict],
    log: str,
) -> dict[str, Any]:
    import numpy as np

    complete = [r for r in results if r.ok and r.output_tokens == load.output_tokens]
    windows = _lead_time_windows(samples)

    def inside(r: StreamResult) -> bool:
        return any(a <= r.sent_s <= b for a, b in windows)

    def sla(rs: list[StreamResult]) -> dict[str, Any]:
        ttft = [r.first_token_s for r in rs]
        itl = [float(np.mean(r.itl_s)) for r in rs if r.itl_s]
        met = sum(1 for r in rs if r.first_token_s <= mock.ttft_sla_s
                  and (not r.itl_s or np.mean(r.itl_s) <= mock.itl_sla_s))  # fmt: skip
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else math.nan  # noqa: E731
        return {"requests": len(rs), "sla_attainment": met / len(rs) if rs else math.nan,
                "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "itl_mean_p50_s": pct(itl, 50), "itl_mean_p99_s": pct(itl, 99)}  # fmt: skip

    sizes = [s.get("ready", 0) + s.get("starting", 0) for s in samples]
    return {
        "load": load.__dict__,
        "mock": {k: v for k, v in mock.__dict__.items() if k != "prefill_ms"},
        "requests": len(results),
        "errors": sum(1 for r in results if not r.ok),
        "error_kinds": sorted({r.error for r in results if r.error})[:5],
        "incomplete_streams": len(results) - len(complete) - sum(1 for r in results if not r.ok),
        "replicas_max": max(sizes, default=0),
        "replicas_final": sizes[-1] if sizes else 0,
        "ready_max": max((s.get("ready", 0) for s in samples), default=0),
        "lead_time_s": max((s.get("lead_time_s", 0) for s in samples), default=0.0),
        "lead_time_windows_s": windows,
        "outside_lead_time": sla([r for r in complete if not inside(r)]),
        "inside_lead_time": sla([r for r in complete if inside(r)]),
        "scale_ups": log.count("serving after"),
        "drains": log.count("drained and stopped"),
        "migrations_logged": log.count("migrat"),
        "workers_at_end": len(workers),
        "timeline": samples,
    }


def _lead_time_windows(samples: list[dict[str, float]]) -> list[tuple[float, float]]:
    """Spans where a replica was ordered and not serving yet (``starting`` > 0)."""
    windows, start = [], None
    for s in samples:
        if s.get("starting", 0) > 0 and start is None:
            start = s["t"]
        elif s.get("starting", 0) == 0 and start is not None:
            windows.append((start, s["t"]))
            start = None
    if start is not None:
        windows.append((start, samples[-1]["t"]))
    return windows


def report(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="planner step load (strata serve --planner, mock workers)")
    for column in ("requests", "SLA met", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"):
        table.add_column(column, justify="right")
    table.add_column("window", justify="left")
    for key in ("outside_lead_time", "inside_lead_time"):
        row = payload[key]
        table.add_row(
            str(row["requests"]), f"{row['sla_attainment']:.1%}",
            f"{row['ttft_p50_s']:.3f}", f"{row['ttft_p99_s']:.3f}",
            f"{row['itl_mean_p50_s'] * 1000:.1f} ms", f"{row['itl_mean_p99_s'] * 1000:.1f} ms",
            key.replace("_", " "),
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"requests {payload['requests']}, errors {payload['errors']}, incomplete streams "
        f"{payload['incomplete_streams']}; replicas max {payload['replicas_max']} (ready "
        f"{payload['ready_max']}), final {payload['replicas_final']}; scale-ups "
        f"{payload['scale_ups']}, drains {payload['drains']}; lead time: one worker's start "
        f"{payload['worker_start_s']:.1f} s before the run, the planner's "
        f"{payload['lead_time_s']:.1f} s at most; wall {payload['wall_s']:.0f} s, load "
        f"{payload['loadavg']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="A model directory (config, "
                        "tokenizer); the mock engine uses only its shape.")  # fmt: skip
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--base-rate", type=float, default=StepLoad.base_rate)
    parser.add_argument("--out", type=Path, default=None, help="Write the figures as JSON.")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    load = StepLoad(base_rate=args.base_rate, time_scale=args.time_scale)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="planner-step-") as tmp:
        payload = run_step(args.model, args.workdir or Path(tmp), load, MockWorkers())
    payload["wall_s"] = time.perf_counter() - started
    payload["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    report(payload)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
