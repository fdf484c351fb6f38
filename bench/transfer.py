"""KV transfer benchmark: NIXL and TCP pulls between two processes beside an in-process copy.

    python -m bench.transfer [--layers 32] [--kv-heads 8] [--head-dim 128] [--block-size 16]
                             [--dtype bfloat16] [--blocks 1,16,256] [--pool-blocks 512]
                             [--transports nixl,nixl-ucx-tcp,tcp] [--repeats 5] [--threads N]
                             [--device cpu|cuda:0] [--decode-device cuda:1]
                             [--layout block|layer] [--out bench/results/transfer.json]

Defaults are Llama-3-8B's KV shape: 32 layers x (K, V) x 16 tokens x 8 KV heads x 128 dims x
2 bytes = 2 MiB per block, stored as the engine stores it: ``--layout block`` (the default),
``[blocks, layers, 2, 16, 8, 128]``, one block is one run of 2 MiB; ``--layout layer``, the
engine's layout before issue 13, ``[layers, 2, blocks, 16, 8, 128]``, one block is 64 runs of
32 KiB, one per layer and K/V.

Every transport variant runs in two fresh processes: a "prefill" process that registers a pool
filled with a known byte pattern and serves it, and a "decode" process that registers its own
pool, connects, and pulls ``n`` blocks per request (one warm-up, then ``--repeats`` timed pulls;
the pulled bytes are checked against the pattern). Variants:

* ``nixl``: NIXL, UCX backend, UCX's own transport choice (shared memory between two local
  processes);
* ``nixl-ucx-tcp``: the same with ``UCX_TLS=tcp`` in both processes (what crosses hosts without
  RDMA);
* ``tcp``: Strata's plain TCP fallback.

The baselines run in this process in the same run: ``copy`` moves the same blocks between two
pools as the engine's ``read_kv_blocks`` + ``write_kv_blocks`` do (``index_select`` then
``index_copy_`` on the block axis of the cache tensor), and ``memcpy`` copies the same number of
bytes with one contiguous ``copy_``. Block ids
are either ``contiguous`` (consecutive on both sides) or ``scattered`` (seeded random, distinct).
Throughput is bytes over the median wall time of one pull, in GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, machine_info, print_table, summarize, write_json
from serving.transfer import BlockLayout, make_transport

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VARIANTS = {  # name: (make_transport kind, extra environment of both processes)
    "nixl": ("nixl", {}),
    "nixl-ucx-tcp": ("nixl", {"UCX_TLS": "tcp"}),  # plus cuda_copy where there are GPUs
    "tcp": ("tcp", {}),
}
PATTERNS = ("contiguous", "scattered")


@dataclass(frozen=True)
class PoolSpec:
    """The KV pool both processes hold: the engine's cache shape."""

    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: str
    prefill_device: str = "cpu"
    decode_device: str = "cpu"
    layout_kind: str = (
        "block"  # "block": [blocks, layers, 2, ...]; "layer": [layers, 2, blocks, ...]
    )

    @property
    def block_axis(self) -> int:
        return 0 if self.layout_kind == "block" else 2

    @property
    def shape(self) -> tuple[int, ...]:
        inner = (self.block_size, self.kv_heads, self.head_dim)
        if self.layout_kind == "block":
            return (self.num_blocks, self.layers, 2, *inner)
        return (self.layers, 2, self.num_blocks, *inner)

    @property
    def layout(self) -> BlockLayout:
        elem = _DTYPES[self.dtype].itemsize
        if self.layout_kind == "block":
            block_bytes = self.layers * 2 * self.block_size * self.kv_heads * self.head_dim * elem
            return BlockLayout.block_major(self.num_blocks, block_bytes)
        return BlockLayout.for_kv_cache(self.shape, elem)


@dataclass(frozen=True)
class Case:
    num_blocks: int
    pattern: str
    remote_ids: list[int]
    local_ids: list[int]


def make_cases(block_counts: Sequence[int], pool_blocks: int, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for n in block_counts:
        if n > pool_blocks // 2:
            raise ValueError(f"{n} blocks need --pool-blocks >= {2 * n}")
        tail = list(range(pool_blocks - n, pool_blocks))
        cases.append(Case(n, "contiguous", list(range(n)), tail))
        cases.append(Case(n, "scattered", rng.sample(range(pool_blocks), n),
                          rng.sample(range(pool_blocks), n)))  # fmt: skip
    return cases


def byte_view(pool: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``pool``'s bytes as ``[regions, num_blocks, block_bytes]`` uint8 (same memory)."""
    return (
        pool.view(-1)
        .view(torch.uint8)
        .view(layout.num_regions, layout.num_blocks, layout.block_bytes)
    )


def fill_pattern(pool: torch.Tensor, layout: BlockLayout) -> None:
    """Byte ``i`` of block ``b`` in region ``r`` is ``(i + 7 r + 13 b) mod 256``."""
    view = byte_view(pool, layout)
    ramp = torch.arange(layout.block_bytes, dtype=torch.int64, device=pool.device) % 256
    for region in range(layout.num_regions):
        shift = (7 * region + 13 * torch.arange(layout.num_blocks, device=pool.device)) % 256
        view[region] = ((ramp[None, :] + shift[:, None]) % 256).to(torch.uint8)


def check_pattern(pool: torch.Tensor, layout: BlockLayout, case: Case) -> bool:
    view = byte_view(pool, layout)
    ramp = torch.arange(layout.block_bytes, dtype=torch.int64, device=pool.device) % 256
    local = torch.tensor(case.local_ids, device=pool.device)
    remote = torch.tensor(case.remote_ids, device=pool.device)
    for region in range(layout.num_regions):
        shift = (7 * region + 13 * remote) % 256
        expected = ((ramp[None, :] + shift[:, None]) % 256).to(torch.uint8)
        if not torch.equal(view[region].index_select(0, local), expected):
            return False
    return True


# ---- the two processes of one variant ----


def prefill_process(spec: PoolSpec, kind: str, out: mp.Queue, stop: mp.Event) -> None:
    try:
        pool = torch.empty(spec.shape, dtype=_DTYPES[spec.dtype], device=spec.prefill_device)
        fill_pattern(pool, spec.layout)
        with make_transport(kind) as transport:  # type: ignore[arg-type]
            transport.register_pool(pool, spec.layout)
            out.put(transport.metadata())
            while not stop.wait(0.01):
                transport.poll_notifications()
    except Exception as exc:
        out.put(exc)


def decode_process(
    spec: PoolSpec, kind: str, peer_metadata: dict, cases: list[Case], repeats: int, out: mp.Queue
) -> None:
    try:
        pool = torch.zeros(spec.shape, dtype=_DTYPES[spec.dtype], device=spec.decode_device)
        with make_transport(kind) as transport:  # type: ignore[arg-type]
            transport.register_pool(pool, spec.layout)
            started = time.perf_counter()
            peer = transport.connect(peer_metadata)
            result: dict[str, Any] = {"connect_s": time.perf_counter() - started, "cases": []}
            for case in cases:
                times_s = []
                for i in range(repeats + 1):
                    started = time.perf_counter()
                    transport.pull(peer, case.remote_ids, case.local_ids)
                    elapsed = time.perf_counter() - started
                    if i == 0:
                        first_s = elapsed
                    else:
                        times_s.append(elapsed)
                ok = check_pattern(pool, spec.layout, case)
                result["cases"].append({"first_s": first_s, "times_s": times_s, "exact": ok})
            transport.notify(peer, b"done")
        out.put(result)
    except Exception as exc:
        out.put(exc)


@contextmanager
def environment(extra: dict[str, str]):
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_variant(name: str, spec: PoolSpec, cases: list[Case], repeats: int) -> dict[str, Any]:
    """Both processes of one variant; their result, or ``{"skipped": reason}``."""
    kind, extra_env = VARIANTS[name]
    if "UCX_TLS" in extra_env and torch.cuda.is_available():
        # NIXL refuses a UCX_TLS without a CUDA transport on a machine with GPUs.
        extra_env = {**extra_env, "UCX_TLS": extra_env["UCX_TLS"] + ",cuda_copy"}
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    stop = ctx.Event()
    with environment(extra_env):
        prefill = ctx.Process(target=prefill_process, args=(spec, kind, out, stop))
        prefill.start()
        try:
            metadata = out.get(timeout=120)
            if isinstance(metadata, Exception):
                return {"skipped": f"{type(metadata).__name__}: {metadata}"}
            decode = ctx.Process(
                target=decode_process, args=(spec, kind, metadata, cases, repeats, out)
            )
            decode.start()
            result = out.get(timeout=1800)
            decode.join(timeout=60)
        finally:
            stop.set()
            prefill.join(timeout=60)
            if prefill.is_alive():
                prefill.kill()
    if isinstance(result, Exception):
        return {"skipped": f"{type(result).__name__}: {result}"}
    return result


# ---- in-process baselines ----


def measure_copies(spec: PoolSpec, cases: list[Case], repeats: int) -> list[dict[str, Any]]:
    layout = spec.layout
    axis = spec.block_axis
    device = torch.device(spec.decode_device)
    src = torch.empty(spec.shape, dtype=_DTYPES[spec.dtype], device=device)
    fill_pattern(src, layout)
    dst = torch.zeros_like(src)
    src_flat = src.view(-1).view(torch.uint8)
    max_bytes = max(case.num_blocks for case in cases) * layout.bytes_per_block
    scratch = torch.zeros(max_bytes, dtype=torch.uint8, device=device)
    results = []
    for case in cases:
        remote = torch.tensor(case.remote_ids, device=device)
        local = torch.tensor(case.local_ids, device=device)
        num_bytes = case.num_blocks * layout.bytes_per_block

        def block_copy(remote=remote, local=local) -> None:
            # ModelRunner.read_kv_blocks on one side, write_kv_blocks on the other.
            dst.index_copy_(axis, local, src.index_select(axis, remote))

        def memcpy(num_bytes=num_bytes) -> None:
            scratch[:num_bytes].copy_(src_flat[:num_bytes])

        copy_s = timed(block_copy, repeats, device)
        exact = check_pattern(dst, layout, case)
        memcpy_s = timed(memcpy, repeats, device)
        results.append({"copy": copy_s, "memcpy": memcpy_s, "copy_exact": exact})
    return results


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    # The tensors' own device: a bare synchronize() waits for the *current* device only, and a
    # copy on cuda:1 timed that way measures its launch (seen: 45 us for any size).
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times_s.append(time.perf_counter() - started)
    return times_s


# ---- report ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--blocks", default="1,16,256", help="blocks per pull, comma-separated")
    parser.add_argument("--pool-blocks", type=int, default=512, help="blocks in each pool")
    parser.add_argument("--transports", default=",".join(VARIANTS), help="variants to run")
    parser.add_argument("--repeats", type=int, default=5, help="timed pulls after a warm-up")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default torch's)")
    parser.add_argument("--device", default="cpu", help="the prefill pool's device: cpu, cuda:0")
    parser.add_argument("--decode-device", help="the decode pool's device (default --device)")
    parser.add_argument(
        "--layout", choices=("block", "layer"), default="block",
        help="block: the engine's block-major cache; layer: the layer-major one before it",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "transfer.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        # For memcpy and copy: on a loaded machine, an op split over threads waits for the
        # descheduled one (8 ms steps were seen on a shared 2-vCPU machine).
        torch.set_num_threads(args.threads)
    spec = PoolSpec(args.layers, args.kv_heads, args.head_dim, args.block_size,
                    args.pool_blocks, args.dtype, args.device,
                    args.decode_device or args.device, args.layout)  # fmt: skip
    variants = [v.strip() for v in args.transports.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown --transports {sorted(unknown)}: choose from {sorted(VARIANTS)}")
    cases = make_cases([int(n) for n in args.blocks.split(",")], spec.num_blocks)
    layout = spec.layout
    print(f"pool {spec.shape} {spec.dtype}: {layout.bytes_per_block / 2**20:g} MiB per block "
          f"({layout.num_regions} runs of {layout.block_bytes / 2**10:g} KiB), "
          f"{layout.pool_bytes / 2**30:.2f} GiB per pool; prefill on {spec.prefill_device}, "
          f"decode on {spec.decode_device}")  # fmt: skip
    payload: dict[str, Any] = {
        "machine": machine_info(),
        "pool": {**asdict(spec), "shape": list(spec.shape), "layout": layout.to_dict()},
        "repeats": args.repeats,
        "copies": measure_copies(spec, cases, args.repeats),
        "variants": {},
    }
    for name in variants:
        print(f"running {name} ...", flush=True)
        payload["variants"][name] = run_variant(name, spec, cases, args.repeats)
    payload["rows"] = make_rows(payload, cases, layout, variants)
    report(payload, variants)
    print(f"wrote {write_json(args.out, payload)}")


def gbps(num_bytes: int, times_s: Sequence[float]) -> float:
    return num_bytes / summarize(times_s)["median"] / 1e9


def make_rows(
    payload: dict[str, Any], cases: list[Case], layout: BlockLayout, variants: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for i, case in enumerate(cases):
        num_bytes = case.num_blocks * layout.bytes_per_block
        copies = payload["copies"][i]
        row: dict[str, Any] = {
            "blocks": case.num_blocks,
            "pattern": case.pattern,
            "bytes": num_bytes,
            "copy_gbps": gbps(num_bytes, copies["copy"]),
            "memcpy_gbps": gbps(num_bytes, copies["memcpy"]),
        }
        for name in variants:
            result = payload["variants"][name]
            if "skipped" in result:
                row[f"{name}_gbps"] = None
                continue
            measured = result["cases"][i]
            row[f"{name}_gbps"] = gbps(num_bytes, measured["times_s"])
            row[f"{name}_median_ms"] = summarize(measured["times_s"])["median"] * 1e3
            row[f"{name}_first_ms"] = measured["first_s"] * 1e3
            row[f"{name}_exact"] = measured["exact"]
            row[f"{name}_vs_memcpy"] = row[f"{name}_gbps"] / row["memcpy_gbps"]
        rows.append(row)
    return rows


def report(payload: dict[str, Any], variants: list[str]) -> None:
    for name in variants:
        if "skipped" in payload["variants"][name]:
            print(f"{name}: SKIPPED ({payload['variants'][name]['skipped']})")
    head = ["blocks", "pattern", "MiB"]
    speeds, ratios = [], []
    for row in payload["rows"]:
        key = [row["blocks"], row["pattern"], row["bytes"] / 2**20]
        exact = all(row.get(f"{name}_exact", True) for name in variants)
        speeds.append(
            key + [row["memcpy_gbps"], row["copy_gbps"]]
            + [row[f"{name}_gbps"] for name in variants] + ["yes" if exact else "NO"]
        )  # fmt: skip
        ratios.append(
            key + [row.get(f"{name}_vs_memcpy") for name in variants]
            + [row.get(f"{name}_first_ms") for name in variants]
        )  # fmt: skip
    print_table(
        "KV pull throughput, GB/s (median of repeats); memcpy and copy run in one process",
        [*head, "memcpy", "copy", *variants, "exact"],
        speeds,
    )
    print_table(
        "Pull throughput / memcpy, and the first (cold) pull in ms",
        head + [f"{name} / memcpy" for name in variants] + [f"{name} 1st ms" for name in variants],
        ratios,
    )


if __name__ == "__main__":
    main()
