"""Acceptance 1-3 of the KV tiers on SmolLM2 (CPU, float32): two real worker processes.

Worker A: a small G1 pool, a disk tier and the shared S3 tier (every block written through to
both: ``--kv-offload-min-uses 1``). Worker B: another process with its own disk tier and the
same S3 prefix, started empty. Outputs are compared token for token with A's first run.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.kvcache.s3 import make_s3_client, parse_s3_uri
from serving.kvcache.tier import block_key
from serving.netutil import free_port, wait_healthy
from serving.protocol.block_hash import hash_token_blocks
from tests.worker.conftest import REPO_ROOT, WorkerProcess, labelled, scrape, wait_until
from tests.worker.test_worker_engine import long_prefix_ids

# Two SmolLM2 processes share two cores with everything else: a generous deadline.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
MODEL = "smollm2"
BLOCK = 16
NUM_BLOCKS = 80  # 1,280 tokens: a 1,000-token prefix and a 1,240-token filler do not fit together


def start_worker(args: list[str], log_path: Path) -> WorkerProcess:
    """A worker process, waited for with a deadline for a loaded 2-core machine."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.worker", "--port", str(port), *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, proc, timeout_s=600)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"worker failed to start:\n{log_path.read_text()[-3000:]}") from None
    return WorkerProcess(url=url, proc=proc, health=health, log_path=log_path)


@pytest.fixture(scope="module")
def workers(
    smollm2_dir: Path,
    s3_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[WorkerProcess, WorkerProcess, str, Path]]:
    from serving.kvcache.s3 import make_s3_client as client_for

    tmp = tmp_path_factory.mktemp("tiers")
    bucket = "kv-smollm2"
    client_for().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/smollm2/v1"

    def args(name: str) -> list[str]:
        # B always onboards what it finds: moto on loopback moves about as many KV bytes per
        # second as SmolLM2 prefills on this CPU, so the cost check could go either way there.
        check = "--kv-cost-check" if name == "a" else "--no-kv-cost-check"
        return [check,
            "--model", str(smollm2_dir), "--served-model-name", MODEL,
            "--num-blocks", str(NUM_BLOCKS), "--max-num-batched-tokens", "2048",
            "--kv-disk-gib", "1", "--kv-disk-dir", str(tmp / f"disk-{name}"),
            "--kv-s3-uri", uri, "--kv-offload-min-uses", "1", "--kv-s3-list-interval", "0.3",
            "--log-level", "warning",
        ]  # fmt: skip

    started: dict[str, WorkerProcess | BaseException] = {}

    def start(name: str) -> None:
        try:
            started[name] = start_worker(args(name), tmp / f"worker-{name}.log")
        except BaseException as exc:
            started[name] = exc

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for value in started.values():
            if isinstance(value, BaseException):
                raise value
        yield started["a"], started["b"], uri, tmp  # type: ignore[misc]
    finally:
        for value in started.values():
            if isinstance(value, WorkerProcess):
                value.stop()


def complete(worker: WorkerProcess, prompt: list[int], max_tokens: int = 8) -> tuple[list, int]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{worker.base_url}/completions", json=body, timeout=600)
    response.raise_for_status()
    data = response.json()
    details = data["usage"].get("prompt_tokens_details") or {}
    return data["choices"][0]["token_ids"], int(details.get("cached_tokens") or 0)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x5A])


def wait_for_objects(uri: str, hashes: list[int]) -> None:
    bucket, prefix = parse_s3_uri(uri)
    client = make_s3_client()

    def present() -> bool:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = {o["Key"] for page in pages for o in page.get("Contents", ())}
        return all(f"{prefix}/{block_key(h)}" in keys for h in hashes)

    wait_until(present, "blocks written through to S3", timeout_s=60)


def wait_listed(worker: WorkerProcess) -> None:
    """Wait for listings of S3 that began after now (every object there now is findable)."""

    def listings() -> float:
        return labelled(scrape(worker.url), "strata_kv_tier_listings_total", tier="G4")

    start = listings()
    wait_until(lambda: listings() >= start + 3, "the S3 tier's listing", timeout_s=60)


def test_tiers_end_to_end(workers: tuple, smollm2_dir: Path) -> None:
    a, b, uri, tmp = workers
    base = long_prefix_ids(smollm2_dir, 1500)
    prefix = [1001, *base[:1009]]  # 1,010 tokens: 63 full blocks
    filler = [1002, *base[:1239]]
    q_prompt, r_prompt = [1003, *base[:400]], [1004, *base[:300]]
    p_hashes = hash_token_blocks(prefix, BLOCK)
    write_foreign_blocks(uri, r_prompt)  # another model's worker shares the prefix (3c)

    # 1. One worker: the prefix leaves G1 and comes back from disk.
    reference, cached = complete(a, prefix)
    assert cached == 0
    wait_for_objects(uri, p_hashes)
    complete(a, filler, max_tokens=2)
    before = scrape(a.url)
    again, cached = complete(a, prefix)
    after = scrape(a.url)
    assert again == reference
    assert cached >= 992
    onboarded_g3 = labelled(after, "strata_kv_tier_onboarded_blocks_total", tier="G3") - labelled(
        before, "strata_kv_tier_onboarded_blocks_total", tier="G3"
    )
    assert onboarded_g3 >= 55, "most of the prefix was meant to come from disk"
    assert labelled(after, "strata_kv_tier_onboarded_blocks_total", tier="G4") == 0

    # 2. Another process with empty G1-G3 serves the prefix from S3.
    wait_listed(b)
    from_s3, cached = complete(b, prefix)
    assert from_s3 == reference and cached >= 992
    assert labelled(scrape(b.url), "strata_kv_tier_onboarded_blocks_total", tier="G4") >= 62

    # 3a. A block flipped in B's disk copy: detected, dropped, recomputed.
    b_disk = tmp / "disk-b" / block_key(p_hashes[40])
    wait_until(b_disk.exists, "B's write-through of the prefix to its disk", timeout_s=60)
    complete(b, filler, max_tokens=2)  # from S3 (A computed it): evicts the prefix from G1
    b_disk.write_bytes(flip_last_byte(b_disk.read_bytes()))
    corrupted_disk, cached = complete(b, prefix)
    assert corrupted_disk == reference
    assert cached <= 41 * BLOCK  # the blocks before the bad one (+ what G1 kept)

    # 3b. A block flipped in S3 (written by A): B detects it and recomputes.
    q_reference, _ = complete(a, q_prompt)
    q_hashes = hash_token_blocks(q_prompt, BLOCK)
    wait_for_objects(uri, q_hashes)
    bucket, prefix_key = parse_s3_uri(uri)
    s3 = make_s3_client()
    key = f"{prefix_key}/{block_key(q_hashes[3])}"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=flip_last_byte(body))
    wait_listed(b)
    q_out, cached = complete(b, q_prompt)
    assert q_out == q_reference and cached == 3 * BLOCK
    values = scrape(b.url)
    assert labelled(values, "strata_kv_tier_checksum_failures_total", tier="G3") == 1
    assert labelled(values, "strata_kv_tier_checksum_failures_total", tier="G4") == 1
    assert labelled(values, "strata_kv_tier_checksum_failures_total") == 2

    # 3c. Blocks written by a worker of another model under the same prefix: refused.
    r_out, cached = complete(b, r_prompt)
    assert cached == 0
    r_reference, _ = complete(a, r_prompt)
    assert r_out == r_reference
    values = scrape(b.url)
    assert (
        labelled(values, "strata_kv_tier_rejected_blocks_total", tier="G4", reason="foreign") >= 1
    )
    assert labelled(values, "strata_kv_tier_checksum_failures_total") == 2


def write_foreign_blocks(uri: str, prompt: list[int]) -> None:
    """The first blocks of ``prompt`` as a bfloat16 build of the model would store them."""
    import torch

    from serving.kvcache.header import ModelIdentity, make_header

    other = ModelIdentity("sha256:another-model", 30, 3, 64, "bfloat16", BLOCK)
    bucket, prefix = parse_s3_uri(uri)
    s3 = make_s3_client()
    hashes = hash_token_blocks(prompt, BLOCK)[:4]
    for i, block_hash in enumerate(hashes):
        payload = torch.zeros(30 * 2 * BLOCK * 3 * 64 * 2, dtype=torch.uint8).numpy()
        tokens = prompt[i * BLOCK : (i + 1) * BLOCK]
        parent = hashes[i - 1] if i else None
        header = make_header(block_hash, parent, tokens, memoryview(payload), other).encode()
        s3.put_object(
            Bucket=bucket, Key=f"{prefix}/{block_key(block_hash)}", Body=header + payload.tobytes()
        )
