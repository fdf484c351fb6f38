"""The CPU engine's memory policy (Linux): keep the memory a step frees for the next step
(glibc), and back the weights and the KV pool with transparent huge pages.

PyTorch's CPU allocator hands every tensor straight back to ``malloc``. With glibc's default,
dynamic thresholds, the heap top is trimmed (``brk``) once a step's activations are freed and
blocks above the mmap threshold are unmapped, so the next step faults the same pages in again,
each zeroed by the kernel: SmolLM2 float32 on one thread took 20-50k minor faults per 33
decode steps at batch 8 and 9-44k per 512-token prefill. Fixed thresholds keep that memory in
the heap; the process's footprint stays at its peak, as with the CUDA caching allocator.

Every decode step streams all the weights and reads each layer's slice of every block it
attends (12 KiB runs, one pool block apart in the block-major layout). One 2 MiB page's TLB
entry covers what takes 512 with 4 KiB pages (``madvise(MADV_HUGEPAGE)``, which THP's default
``madvise`` mode honours). Neither setting changes a value, a layout or an alignment the math
sees: outputs are bit-identical.

Owns one process-wide heap setting and two allocation helpers; no engine state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import nn

# glibc's mallopt parameters (malloc.h) and madvise's MADV_HUGEPAGE (linux/mman.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MADV_HUGEPAGE = 14
HUGE_PAGE_BYTES = 2 << 20
# Free heap top kept instead of trimmed; allocations up to 32 MiB (glibc's ceiling on 64-bit)
# come from the heap instead of their own mapping.
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (idempotent); ``False`` where there is no glibc
    ``mallopt`` (macOS, Windows) or it refuses.

    Values only move between steps through ``malloc``; no tensor's contents or alignment
    changes (PyTorch aligns every CPU allocation to 64 bytes itself).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    trim_ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return trim_ok and mmap_ok


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype)`` on the CPU, its 2 MiB-aligned interior advised as huge pages
    before the first touch (the kernel then faults it in as 2 MiB pages where it can; THP
    ``enabled`` set to ``never`` or a failed ``madvise`` leaves 4 KiB pages: same tensor)."""
    tensor = torch.empty(shape, dtype=dtype)
    libc = _libc()
    start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if libc is not None and hasattr(libc, "madvise") and end > start:
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise.restype = ctypes.c_int
        libc.madvise(start, end - start, MADV_HUGEPAGE)
    return tensor.zero_()


def pack_on_huge_pages(module: nn.Module, align_bytes: int = 4096) -> None:
    """Move ``module``'s parameters (CPU, uninitialized) into one zeroed buffer on huge pages,
    each at an ``align_bytes`` boundary; copy the weights in afterwards.

    Parameters stay the same tensors (``param.data`` is replaced), so ``load_weights`` and
    tied weights see no difference.
    """
    params = list(module.parameters())
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += -(-param.nbytes // align_bytes) * align_bytes
    buffer = zeros_on_huge_pages((total,), torch.uint8)
    for param, offset in zip(params, offsets, strict=True):
        view = buffer[offset : offset + param.nbytes].view(param.dtype).view(param.shape)
        param.data = view


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
