"""TTFT of a returning conversation prefix served from each KV tier against recomputing it.

    python -m bench.kv_tiers [--device cpu] [--model DIR] [--prefix-tokens 2000]
        [--tiers G2,G3,G4] [--repeats 3] [--out bench/results/kv-tiers-cpu.json]
    python -m bench.kv_tiers --device cuda --random-llama3-8b --prefix-tokens 16384 --tiers G2

One engine in this process (no HTTP), one tier at a time behind it. Per tier and repeat:
turn 1 is a fresh prompt (``prefix + 32 tokens``): its TTFT is the recompute baseline; its
blocks are written through to the tier; the device cache is then cleared (G1 forgets, the tier
keeps) and turn 2 (the same prefix + 32 other tokens, same length) onboards the prefix from the
tier and computes the rest; turn 3 (a third suffix) finds the prefix still in G1: its TTFT is the
floor that an onboard adds its copy to. Turn 2 runs with the cost check off (so the onboard is
measured even where the check would recompute); the check's own choice, from the speeds measured
so far, is reported beside it. Ratios are taken within the run. G4 uses ``AWS_ENDPOINT_URL_S3``
when set, else a moto server on loopback started here. ``--no-verify`` (GPU) also reports onboarding
without checksum verification, to show what the checks cost. G3's files are dropped from the
page cache before turn 2 (``--warm-disk`` keeps them), so the onboard reads the disk.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.engine import LLAMA3_8B_SHAPE
from bench.kv_tiers_driver import Driver
from serving.engine.core import EngineCore
from serving.engine.model_runner import ModelRunner
from serving.engine.scheduler import SchedulerConfig
from serving.kvcache.copy_run import DEFAULT_MAX_RUN_BYTES
from serving.kvcache.disk import DiskTier
from serving.kvcache.host import HostTier, default_hash_processes
from serving.kvcache.tier import KVTier
from serving.startup import freeze_startup_heap

SUFFIX_TOKENS = 32
# The engine bench's Llama-3-8B shape as a checkpoint's config.json (random weights, bf16).
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    **LLAMA3_8B_SHAPE,
    "torch_dtype": "bfloat16",
}


def make_engine(args: argparse.Namespace, model_dir: Path) -> EngineCore:
    prompt_tokens = args.prefix_tokens + SUFFIX_TOKENS
    num_blocks = 2 * (prompt_tokens // 16 + 2) + 16
    runner = ModelRunner(
        model_dir,
        device=args.device,
        dtype=args.dtype,
        num_blocks=num_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=4,
        load_format="dummy" if args.random_llama3_8b else "auto",
    )
    config = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(runner.arch.max_model_len, num_blocks * 16),
    )
    return EngineCore(runner, config)


def make_store(
    tier: str,
    block_bytes: int,
    capacity_blocks: int,
    work: Path,
    on_cuda: bool,
    hash_processes: int | None = None,
):
    if tier == "G2":
        if hash_processes is None:
            hash_processes = default_hash_processes(on_cuda)
        return HostTier(
            capacity_blocks, block_bytes, pin_memory=on_cuda, hash_processes=hash_processes
        )
    if tier == "G3":
        return DiskTier(work / "disk", capacity_blocks)
    from serving.kvcache.s3 import S3Tier, make_s3_client

    bucket = f"kv-bench-{random.randrange(1 << 30):x}"
    make_s3_client().create_bucket(Bucket=bucket)
    return S3Tier(f"s3://{bucket}/bench", capacity_blocks)


def measure_tier(
    core: EngineCore, new_store: Callable[[], KVTier], args: argparse.Namespace, seed: int
) -> dict:
    """Each pass (with checksums, then without) gets a store of its own: the manager closes
    its stores when it is closed (the host tier's helpers and shared memory with them)."""
    on_cuda = args.device.startswith("cuda")
    rng = random.Random(seed)
    vocab = core.executor.arch.vocab_size  # type: ignore[attr-defined]
    rows: dict[str, list[float]] = {
        "recompute_s": [],
        "onboard_s": [],
        "onboard_copy_s": [],
        "onboard_checked_s": [],
        "onboard_admitted_s": [],
        "after_onboard_s": [],
        "g1_hit_s": [],
    }
    for verify in (True, False) if args.no_verify else (True,):
        store = new_store()
        driver = Driver(core, store, on_cuda=on_cuda, verify=verify,
                        max_copy_run_bytes=args.copy_run_mib << 20,
                        num_read_threads=args.read_threads)  # fmt: skip
        try:
            for r in range(args.repeats + 1):  # the first round warms up (kernels, threads)
                prefix = [rng.randrange(10, vocab) for _ in range(args.prefix_tokens)]
                turn1 = prefix + [rng.randrange(10, vocab) for _ in range(SUFFIX_TOKENS)]
                turn2 = prefix + [rng.randrange(10, vocab) for _ in range(SUFFIX_TOKENS)]
                recompute_s, cached1 = driver.ttft(f"t1-{seed}-{verify}-{r}", turn1, r > 0)
                assert cached1 == 0
                driver.wait_stored()
                assert core.reset_prefix_cache()
                if isinstance(store, DiskTier) and not args.warm_disk:
                    evict_from_page_cache(store.directory)
                onboard_s, cached2 = driver.ttft(f"t2-{seed}-{verify}-{r}", turn2, r > 0)
                assert cached2 >= args.prefix_tokens - 16, (cached2, args.prefix_tokens)
                turn3 = prefix + [rng.randrange(10, vocab) for _ in range(SUFFIX_TOKENS)]
                g1_hit_s, cached3 = driver.ttft(f"t3-{seed}-{verify}-{r}", turn3, r > 0)
                assert cached3 >= args.prefix_tokens - 16, (cached3, args.prefix_tokens)
                driver.wait_stored()
                assert core.reset_prefix_cache()
                if r == 0:
                    continue
                if verify:
                    rows["recompute_s"].append(recompute_s)
                    rows["onboard_s"].append(onboard_s)
                    rows["onboard_copy_s"].append(driver.onboard_s[-1])
                    rows["onboard_checked_s"].append(driver.checked_s[-1])
                    rows["onboard_admitted_s"].append(driver.admitted_s[-1])
                    rows["after_onboard_s"].append(driver.after_onboard_s)
                    rows["g1_hit_s"].append(g1_hit_s)
                else:
                    rows.setdefault("onboard_no_verify_s", []).append(onboard_s)
            num_blocks = args.prefix_tokens // core.limits.block_size
            if verify:  # copies launched per onboard: runs of consecutive blocks coalesce
                copies_per_onboard = driver.manager.num_onboard_copies / (args.repeats + 1)
            driver.stack.cost.check = True
            decision = driver.stack.cost.decide([store.name] * num_blocks)
        finally:
            driver.close()
    if on_cuda and isinstance(store, HostTier):
        prefix_bytes = args.prefix_tokens * core.executor.kv_bytes_per_token  # type: ignore[attr-defined]
        rows["one_pinned_copy_s"] = pinned_copy_s(prefix_bytes, torch.device(args.device))
    out: dict[str, Any] = {k: statistics.median(v) for k, v in rows.items() if v}
    out["samples"] = rows
    out["copies_per_onboard"] = copies_per_onboard
    out["copy_run_mib"] = args.copy_run_mib
    out["ratio_onboard_to_recompute"] = out["onboard_s"] / out["recompute_s"]
    out["cost_check"] = {
        "choice": "onboard" if decision.onboard else "recompute",
        "est_onboard_s": decision.est_onboard_s,
        "est_recompute_s": decision.est_recompute_s,
        "measured_choice": "onboard" if out["onboard_s"] < out["recompute_s"] else "recompute",
    }
    return out


def pinned_copy_s(num_bytes: int, device: torch.device, repeats: int = 5) -> list[float]:
    """The floor for G2: the same bytes host -> device in one copy from pinned memory."""
    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    times_s = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i:  # the first copy warms up
            times_s.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return times_s


def evict_from_page_cache(directory: Path) -> None:
    """Flush the tier's files and drop them from the page cache: turn 2 reads the disk."""
    for entry in os.scandir(directory):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def start_moto_if_needed(tiers: Sequence[str]) -> subprocess.Popen | None:
    if "G4" not in tiers or os.environ.get("AWS_ENDPOINT_URL_S3"):
        return None
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL_S3=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)  # poll interval while the server starts
    proc.kill()
    raise RuntimeError("moto server did not start")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    work = Path(tempfile.mkdtemp(prefix="strata-kv-tiers-"))
    moto = start_moto_if_needed(tiers)
    try:
        model_dir = args.model
        if args.random_llama3_8b:
            model_dir = work / "llama3-8b"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
        elif model_dir is None:
            from bench.engine import smollm2_dir

            model_dir = smollm2_dir()
        core = make_engine(args, model_dir)
        freeze_startup_heap()  # as the worker does once its engine is built
        runner: Any = core.executor
        block_bytes = runner.kv_pool.block_bytes
        capacity = 2 * (args.prefix_tokens // 16 + 4)
        results = {}
        for i, tier in enumerate(tiers):
            new_store = functools.partial(
                make_store,
                tier,
                block_bytes,
                capacity,
                work,
                args.device.startswith("cuda"),
                args.hash_processes,
            )
            results[tier] = measure_tier(core, new_store, args, seed=args.seed + i)
            print(
                f"{tier}: {json.dumps({k: v for k, v in results[tier].items() if k != 'samples'})}",
                flush=True,
            )
        payload = {
            "config": {k: str(v) for k, v in vars(args).items()},
            "machine": machine(),
            "block_bytes": block_bytes,
            "kv_bytes_per_token": runner.kv_bytes_per_token,
            "tiers": results,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if moto is not None:
            moto.kill()
            moto.wait()
    report(payload)
    out = Path(args.out or f"bench/results/kv-tiers-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return payload


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def report(payload: dict) -> None:
    config = payload["config"]
    print(
        f"\nprefix {config['prefix_tokens']} tokens, device {config['device']}, onboard copies "
        f"of up to {config['copy_run_mib']} MiB (0: one per block)"
    )
    print(
        "| tier | TTFT recompute ms | TTFT onboard ms | onboard / recompute | admitted ms "
        "| checked ms | copy ms | after checks ms | TTFT G1 hit ms "
        "| cost check (est onboard / recompute ms) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for tier, r in payload["tiers"].items():
        c = r["cost_check"]
        print(
            f"| {tier} | {r['recompute_s'] * 1e3:.1f} | {r['onboard_s'] * 1e3:.1f} | "
            f"{r['ratio_onboard_to_recompute']:.3f} | {r['onboard_admitted_s'] * 1e3:.1f} | "
            f"{r['onboard_checked_s'] * 1e3:.1f} | "
            f"{r['onboard_copy_s'] * 1e3:.1f} | "
            f"{r['after_onboard_s'] * 1e3:.1f} | {r['g1_hit_s'] * 1e3:.1f} | "
            f"{c['choice']} ({c['est_onboard_s'] * 1e3:.1f} / {c['est_recompute_s'] * 1e3:.1f}) |"
        )
        print(f"|   copies per onboard: {r['copies_per_onboard']:.0f} | | | | | | | | | |")
        if "onboard_no_verify_s" in r:
            print(
                f"|   {tier} without checksums | | {r['onboard_no_verify_s'] * 1e3:.1f} "
                "| | | | | | | |"
            )
        if "one_pinned_copy_s" in r:
            floor_ms = r["one_pinned_copy_s"] * 1e3
            print(f"|   floor: one pinned copy | | | | | | {floor_ms:.1f} | | | |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--model", type=Path, default=None, help="Checkpoint (default: SmolLM2).")
    p.add_argument("--random-llama3-8b", action="store_true", help="Llama-3-8B shape, random.")
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--tiers", default="G2,G3,G4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-verify", action="store_true", help="Also onboard without checksums.")
    p.add_argument(
        "--warm-disk", action="store_true", help="G3: read from the page cache (not evicted)."
    )
    p.add_argument(
        "--copy-run-mib",
        type=int,
        default=DEFAULT_MAX_RUN_BYTES >> 20,
        help="Largest run of consecutive blocks onboarded as one copy (0: a copy per block).",
    )
    p.add_argument(
        "--read-threads",
        type=int,
        default=8,
        help="Threads that read lower tiers and hash payloads (default: the worker's).",
    )
    p.add_argument(
        "--hash-processes",
        type=int,
        default=None,
        help="G2 checksum helper processes (0: hash on the read threads; default: the worker's).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
