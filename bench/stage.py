"""Staging speed: ``strata``'s stage step vs boto3's ``download_file`` with its defaults.

    python -m bench.stage [--weights-mib 384 128] [--repeats 3] [--out bench/results/stage.json]

Both copy the same objects (a model-shaped prefix: large weight files plus small config and
tokenizer files) from one local S3 server (moto, on loopback) in the same run, alternating, so
the ratio holds on a noisy shared machine. The baseline is what a script would write:
``client.download_file`` per object, one after the other, boto3's default TransferConfig
(8 MiB parts, 10 threads per file). The stage step fetches every file's byte ranges with one
thread pool, then hashes each file (sha256, for its manifest), writes the manifest and renames
the directory into place; its figure includes all of that.

Where the time goes is reported per variant: wall time, the client's CPU seconds, the S3
server's CPU seconds (moto is a single Python process: on a small machine it is the
bottleneck), and for the stage step the share spent hashing (timed separately on the same files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import RESULTS_DIR, machine_info, print_table, write_json
from serving.netutil import free_port
from workflows.steps.manifest import file_sha256
from workflows.steps.s3 import make_s3_client
from workflows.steps.stage import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_WORKERS, stage

BUCKET = "bench-stage"
PREFIX = "models/bench-model/"
SMALL_FILES = {"config.json": 2_000, "tokenizer.json": 3_500_000, "generation_config.json": 200}


def start_moto(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    client = make_s3_client(url)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            return proc, url
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto did not start: {log_path.read_text()[-2000:]}") from None
            time.sleep(0.2)


def upload_model(client: Any, weights_mib: list[int], work_dir: Path) -> list[tuple[str, int]]:
    """Put the model's objects; returns (key, size) pairs."""
    client.create_bucket(Bucket=BUCKET)
    sizes = {f"model-{i:05d}-of-{len(weights_mib):05d}.safetensors": mib << 20
             for i, mib in enumerate(weights_mib, 1)}  # fmt: skip
    sizes |= SMALL_FILES
    objects = []
    for name, size in sizes.items():
        path = work_dir / name
        with path.open("wb") as f:
            remaining = size
            while remaining:
                chunk = os.urandom(min(remaining, 8 << 20))
                f.write(chunk)
                remaining -= len(chunk)
        client.upload_file(str(path), BUCKET, PREFIX + name)
        path.unlink()
        objects.append((PREFIX + name, size))
    return objects


def run_boto3(client: Any, objects: list[tuple[str, int]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    for key, _ in objects:
        client.download_file(BUCKET, key, str(out_dir / key.rsplit("/", 1)[1]))


def run_stage(url: str, out_dir: Path, max_workers: int, chunk_mib: int) -> None:
    stage(f"s3://{BUCKET}/{PREFIX}", out_dir, s3_endpoint_url=url, max_workers=max_workers,
          chunk_bytes=chunk_mib << 20, show_progress=False)  # fmt: skip


def measured(fn: Any, server: psutil.Process) -> dict[str, float]:
    me = psutil.Process()
    client_cpu, server_cpu = sum(me.cpu_times()[:2]), sum(server.cpu_times()[:2])
    start_s = time.perf_counter()
    fn()
    wall_s = time.perf_counter() - start_s
    return {
        "wall_s": wall_s,
        "client_cpu_s": sum(me.cpu_times()[:2]) - client_cpu,
        "server_cpu_s": sum(server.cpu_times()[:2]) - server_cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-mib", type=int, nargs="+", default=[384, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS)
    parser.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_BYTES >> 20)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "stage.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="strata-bench-stage-"))
    proc, url = start_moto(work / "moto.log")
    try:
        server = psutil.Process(proc.pid)
        client = make_s3_client(url)
        objects = upload_model(client, args.weights_mib, work)
        total_bytes = sum(size for _, size in objects)
        runs: dict[str, list[dict[str, float]]] = {"boto3 download_file": [], "strata stage": []}
        for i in range(args.repeats + 1):  # the first round warms both up and is dropped
            for name in runs:
                out_dir = work / f"{name.split()[0]}-{i}"
                if name.startswith("boto3"):
                    result = measured(lambda d=out_dir: run_boto3(client, objects, d), server)
                else:
                    result = measured(
                        lambda d=out_dir: run_stage(url, d, args.max_workers, args.chunk_mib),
                        server,
                    )
                if i:
                    runs[name].append(result)
                if name.startswith("strata") and i == args.repeats:
                    staged = next(p for p in out_dir.iterdir() if p.is_dir())
                    start_s = time.perf_counter()
                    for path in staged.iterdir():
                        file_sha256(path)
                    hash_s = time.perf_counter() - start_s
                shutil.rmtree(out_dir)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for name, results in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        summary[name]["MB_per_s"] = total_bytes / 1e6 / summary[name]["wall_s"]
    speedup = summary["boto3 download_file"]["wall_s"] / summary["strata stage"]["wall_s"]
    summary["strata stage"]["hash_s"] = hash_s
    rows = [
        [name, s["wall_s"], s["MB_per_s"], s["client_cpu_s"], s["server_cpu_s"]]
        for name, s in summary.items()
    ]
    print_table(
        f"stage {total_bytes / 2**20:.0f} MiB in {len(objects)} files from moto S3 "
        f"(median of {args.repeats}); speedup {speedup:.2f}x; stage hashing {hash_s:.2f} s",
        ["variant", "wall s", "MB/s", "client CPU s", "S3 server CPU s"],
        rows,
    )
    write_json(args.out, {
        "benchmark": "stage", "machine": machine_info(), "total_bytes": total_bytes,
        "num_files": len(objects), "repeats": args.repeats, "max_workers": args.max_workers,
        "chunk_mib": args.chunk_mib, "results": summary, "speedup": speedup, "runs": runs,
    })  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
