"""The CPU engine's heap policy: what a step frees is reused by the next without page faults."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest
import torch

from serving.engine.cpu_memory import keep_freed_memory, pack_on_huge_pages, zeros_on_huge_pages

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") != "libc.so.6",
    reason="glibc mallopt",
)

# A step's activations: 16 buffers of 1 MiB from the heap, written, freed; minor faults per step.
STEPS = """
import ctypes, json, resource, sys
from serving.engine.cpu_memory import keep_freed_memory, pack_on_huge_pages, zeros_on_huge_pages
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
faults = []
for _ in range(4):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [libc.malloc(1 << 20) for _ in range(16)]
    for buffer in buffers:
        libc.memset(buffer, 1, 1 << 20)
    for buffer in buffers:
        libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps(faults))
"""


def _faults_per_step(policy: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, policy], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def test_freed_step_memory_is_reused_without_faults() -> None:
    pages = 16 * (1 << 20) // 4096
    default = _faults_per_step("default")
    kept = _faults_per_step("keep")
    # glibc's default trims the freed heap top: every step faults its pages in again.
    assert all(f > pages // 2 for f in default), default
    # Kept: only the first step grows the heap.
    assert kept[0] > pages // 2 and all(f < pages // 20 for f in kept[1:]), kept


def test_keep_freed_memory_is_idempotent() -> None:
    assert keep_freed_memory()
    assert keep_freed_memory()


def test_huge_page_tensors_are_zeroed_views_of_one_buffer() -> None:
    pool = zeros_on_huge_pages((64, 3, 1024), torch.float32)
    assert pool.is_contiguous() and not pool.any()
    model = torch.nn.Sequential(torch.nn.Linear(300, 7), torch.nn.Linear(7, 5, bias=False))
    param_ids = [id(p) for p in model.parameters()]
    pack_on_huge_pages(model)
    params = list(model.parameters())
    assert [id(p) for p in params] == param_ids  # same Parameter objects, new storage
    base = params[0].untyped_storage().data_ptr()
    offsets = [p.data_ptr() - base for p in params]
    assert offsets == [0, 12288, 16384] and all(
        p.untyped_storage().data_ptr() == base for p in params
    )
    assert not any(p.any() for p in params)
