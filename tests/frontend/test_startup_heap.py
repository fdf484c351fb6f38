"""The frontend moves its start-up heap out of the cyclic GC's reach before it serves."""

from __future__ import annotations

import gc

from serving.frontend.serve import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_startup_heap_frozen_and_later_cycles_still_collected() -> None:
    assert gc.get_freeze_count() == 0
    kept = _Node()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        # What start-up left alive is no longer walked by a full collection ...
        assert not any(obj is kept for obj in gc.get_objects())
        # ... while cycles made after it (by requests) are collected as before.
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
