"""``CopyRun``: blocks that follow each other on both sides go as one copy; anything else (a gap,
another storage, a full run, a non-byte tensor) starts a new one, and every byte lands."""

from __future__ import annotations

import torch

from serving.kvcache.copy_run import CopyRun

BLOCK = 64


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, BLOCK), dtype=torch.uint8, generator=g)


def test_runs_break_at_gaps_other_storages_and_the_size_cap() -> None:
    src = _rows(8, 1)
    other = _rows(2, 2)  # a tensor of its own (a disk read's payload)
    dest = torch.zeros(16, BLOCK, dtype=torch.uint8)
    run = CopyRun(max_bytes=3 * BLOCK)
    plan = [(0, src[0]), (1, src[1]), (2, src[2]), (3, src[3]),  # cap: 3 + 1
            (5, src[4]), (6, src[5]),  # a gap in dest
            (7, other[0]), (8, other[1]),  # another source storage
            (9, src[7])]  # fmt: skip
    for block_id, payload in plan:
        run.add(dest[block_id], payload)
    run.flush()
    assert run.num_copies == 5  # dest [0-2] (cap), [3] (gap), [5-6], [7-8] (other), [9]
    for block_id, payload in plan:
        assert torch.equal(dest[block_id], payload)


def test_a_strided_source_is_copied_alone_and_the_run_goes_on() -> None:
    src = _rows(4, 3)
    strided = _rows(2, 4).t().contiguous().t()[0]  # a row of a transposed tensor: stride 2
    dest = torch.zeros(4, BLOCK, dtype=torch.uint8)
    run = CopyRun()
    run.add(dest[0], src[0])
    run.add(dest[1], strided)  # not a contiguous byte view: launched alone, after the run
    run.add(dest[2], src[2])
    run.add(dest[3], src[3])
    run.flush()
    assert run.num_copies == 3
    assert torch.equal(dest[1], strided)
    assert torch.equal(dest[0], src[0]) and torch.equal(dest[2:], src[2:])
