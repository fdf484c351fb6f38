"""Coalescing of onboard copies: blocks whose source bytes and destination bytes both follow the
previous block's go as one copy.

A returning prefix read from the host tier often sits in consecutive slots and lands in
consecutive device blocks; one DMA copy of the run costs what its bytes cost, where one copy per
2 MiB block adds a launch and the copy engine's setup each time.
"""

from __future__ import annotations

import torch

# A run is launched once it holds this much, so the copy engine starts while later headers are
# still being checked.
DEFAULT_MAX_RUN_BYTES = 64 << 20


class CopyRun:
    """Admitted ``src -> dest`` block copies not launched yet: one contiguous source span and one
    contiguous destination span (1-D ``uint8`` views into one storage each), or nothing."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_RUN_BYTES) -> None:
        self.max_bytes = max_bytes
        self.num_copies = 0  # launched so far
        self._dest: torch.Tensor | None = None
        self._src: torch.Tensor | None = None
        self._num_bytes = 0

    def add(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """Queue one block (``dest.numel() == src.numel()``); the pending run is launched first
        when the block does not extend it, or when the run is full."""
        if not (_byte_view(dest) and _byte_view(src)):
            self.flush()
            self._launch(dest, src)
            return
        num_bytes = dest.numel()
        if self._dest is not None and self._src is not None:
            if (
                self._num_bytes + num_bytes <= self.max_bytes
                and _follows(self._dest, self._num_bytes, dest)
                and _follows(self._src, self._num_bytes, src)
            ):
                self._num_bytes += num_bytes
                return
            self.flush()
        self._dest, self._src, self._num_bytes = dest, src, num_bytes

    def flush(self) -> None:
        """Launch the pending run, if any."""
        if self._dest is None or self._src is None:
            return
        dest, src = self._dest, self._src
        if self._num_bytes != dest.numel():  # more than one block
            dest, src = _span(dest, self._num_bytes), _span(src, self._num_bytes)
        self._dest = self._src = None
        self._num_bytes = 0
        self._launch(dest, src)

    def _launch(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        if src.shape != dest.shape:
            src = src.reshape(dest.shape)
        dest.copy_(src, non_blocking=dest.is_cuda)
        self.num_copies += 1


def _byte_view(t: torch.Tensor) -> bool:
    return t.dtype == torch.uint8 and t.dim() == 1 and t.is_contiguous()


def _follows(first: torch.Tensor, num_bytes: int, nxt: torch.Tensor) -> bool:
    """``nxt`` starts where ``num_bytes`` from ``first`` end, in the same storage (checked by
    address and by the views' common base: a few attribute reads per block, where the storage
    objects cost microseconds each)."""
    return nxt.data_ptr() == first.data_ptr() + num_bytes and _root(nxt) is _root(first)


def _root(t: torch.Tensor) -> torch.Tensor:
    base = t._base
    return t if base is None else base


def _span(first: torch.Tensor, num_bytes: int) -> torch.Tensor:
    return first.as_strided((num_bytes,), (1,), first.storage_offset())
