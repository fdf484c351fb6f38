"""Request traces for replay: Mooncake-format JSONL in, requests with token-id prompts out.

A Mooncake trace line is ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}``; each hash id names one block of ``block_size`` prompt tokens (512 in the
published traces) and equal ids mean equal prefixes. ``PromptBuilder`` turns ids into token ids:

    hash_ids      [ 0        | 14       | 15       | 16 ... ]
    tokens        [ T(0)     | T(14)    | T(15)    | U(request index) ]
                   full blocks: one fixed block per id       last partial block: unique

``T(id)`` is a pure function of (seed, id), so equal ids give token-identical blocks in every
request (and every process), distinct ids give distinct blocks. The last block is partial unless
``input_length`` is a multiple of ``block_size``; it is filled from the request index instead, so
no two requests share a whole prompt (engines never cache a partial block anyway). Tokens come
from a vectorized splitmix64 over ``(seed, key, position)``: no per-block generator, no cache.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

MOONCAKE_BLOCK_SIZE = 512
_POS_BITS = 24  # positions inside one block: block_size < 2**24
_TAIL_POS_BITS = 32  # positions inside a request's unique tail
_TAIL_DOMAIN = np.uint64(1 << 63)  # keys of request-unique tails, apart from hash-id keys
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One trace line; ``arrival_s`` is trace time in seconds (before any speedup)."""

    index: int
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_mooncake(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """Parse a Mooncake-format JSONL trace (timestamps in ms); the first ``limit`` lines.

    Raises ``ValueError`` naming the file and line on a malformed line or a timestamp that
    goes backwards (the replay relies on arrival order).
    """
    requests: list[TraceRequest] = []
    last_ms = -math.inf
    with Path(path).open() as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                timestamp_ms = float(row["timestamp"])
                request = TraceRequest(
                    index=len(requests),
                    arrival_s=timestamp_ms / 1000.0,
                    input_length=int(row["input_length"]),
                    output_length=int(row["output_length"]),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a Mooncake trace line: {exc}") from exc
            if timestamp_ms < last_ms:
                raise ValueError(f"{path}:{line_no}: timestamp {timestamp_ms} goes backwards")
            if request.input_length < 1 or request.output_length < 1:
                raise ValueError(f"{path}:{line_no}: input and output lengths must be >= 1")
            last_ms = timestamp_ms
            requests.append(request)
    return requests


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_azure(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """Parse an Azure LLM inference trace (Azure/AzurePublicDataset: ``TIMESTAMP,ContextTokens,
    GeneratedTokens`` CSV, e.g. ``AzureLLMInferenceTrace_conv.csv``); arrivals in seconds from
    the first row. The traces carry no prefix information: every request gets hash ids of its
    own (``ceil(input / 512)`` of them), so no two share a block.

    Raises ``ValueError`` naming the file and line on a missing column, a malformed row, a
    length below 1 or a timestamp that goes backwards.
    """
    requests: list[TraceRequest] = []
    next_id, first, last_s = 0, None, -math.inf
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace: no column {', '.join(missing)}")
        for row in reader:
            if limit is not None and len(requests) >= limit:
                break
            line_no = reader.line_num
            try:
                stamp = datetime.fromisoformat(row["TIMESTAMP"].strip())
                input_length, output_length = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{line_no}: not an Azure trace row: {exc}") from exc
            first = first or stamp
            arrival_s = (stamp - first).total_seconds()
            if arrival_s < last_s:
                raise ValueError(f"{path}:{line_no}: timestamp {row['TIMESTAMP']} goes backwards")
            if input_length < 1 or output_length < 1:
                raise ValueError(f"{path}:{line_no}: input and output lengths must be >= 1")
            blocks = math.ceil(input_length / MOONCAKE_BLOCK_SIZE)
            requests.append(TraceRequest(len(requests), arrival_s, input_length, output_length,
                                         tuple(range(next_id, next_id + blocks))))  # fmt: skip
            next_id, last_s = next_id + blocks, arrival_s
    return requests


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """A ``.csv`` file is an Azure LLM inference trace, anything else Mooncake JSONL."""
    if Path(path).suffix.lower() == ".csv":
        return load_azure(path, limit)
    return load_mooncake(path, limit)


def write_mooncake(path: Path, requests: Iterable[TraceRequest]) -> None:
    """Write requests as Mooncake JSONL (timestamps rounded to whole milliseconds)."""
    with Path(path).open("w") as f:
        for r in requests:
            row = {
                "timestamp": round(r.arrival_s * 1000.0),
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }
            f.write(json.dumps(row) + "\n")


def jitter_arrivals(
    requests: Sequence[TraceRequest], window_s: float, seed: int = 0
) -> list[TraceRequest]:
    """Spread each arrival uniformly over ``[t, t + window_s)``, keeping arrival order sorted.

    The Mooncake conversation trace buckets arrivals every ~3 s; replayed literally it sends
    synchronized bursts. Indices stay attached to their requests (prompts do not change).
    """
    if window_s <= 0:
        return list(requests)
    rng = random.Random(seed)
    moved = [replace(r, arrival_s=r.arrival_s + rng.random() * window_s) for r in requests]
    moved.sort(key=lambda r: (r.arrival_s, r.index))
    return moved


def make_synthetic_trace(
    num_requests: int,
    *,
    num_groups: int = 8,
    prefix_blocks: int = 6,
    max_suffix_blocks: int = 4,
    output_length: tuple[int, int] = (16, 64),
    rate_per_s: float = 4.0,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    seed: int = 0,
) -> list[TraceRequest]:
    """A Mooncake-shaped trace with shared prefixes, for tests and quick runs.

    Each request picks one of ``num_groups`` shared prefixes (``prefix_blocks`` blocks each,
    popular groups more often), appends 1..``max_suffix_blocks`` fresh blocks, and ends in a
    partial block. Arrivals are Poisson at ``rate_per_s``. Hash ids are handed out
    consecutively, as in Mooncake traces; deterministic in ``seed``.
    """
    rng = random.Random(seed)
    next_id = 0
    groups: list[list[int]] = []
    for _ in range(num_groups):
        groups.append(list(range(next_id, next_id + prefix_blocks)))
        next_id += prefix_blocks
    weights = [1.0 / (g + 1) for g in range(num_groups)]
    requests: list[TraceRequest] = []
    t = 0.0
    for index in range(num_requests):
        prefix = rng.choices(groups, weights)[0]
        num_suffix = rng.randint(1, max_suffix_blocks)
        hash_ids = [*prefix, *range(next_id, next_id + num_suffix)]
        next_id += num_suffix
        input_length = (len(hash_ids) - 1) * block_size + rng.randint(1, block_size - 1)
        requests.append(
            TraceRequest(
                index=index,
                arrival_s=round(t, 3),
                input_length=input_length,
                output_length=rng.randint(*output_length),
                hash_ids=tuple(hash_ids),
            )
        )
        t += rng.expovariate(rate_per_s)
    return requests


def _splitmix64(keys: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = keys
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class PromptBuilder:
    """Turns trace requests into prompt token ids; pure (no state but its settings).

    Token ``j`` of the block for hash id ``h`` is ``mix(h << 24 | j)``; token ``j`` of request
    ``i``'s unique tail is ``mix(2**63 | i << 32 | j)``; both salted by ``seed`` and reduced
    modulo ``vocab_size``.
    """

    def __init__(self, block_size: int, vocab_size: int, seed: int = 0) -> None:
        if not 1 <= block_size < 1 << _POS_BITS:
            raise ValueError(f"block_size must be in [1, 2**{_POS_BITS}), got {block_size}")
        if vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.seed = seed
        self._salt = np.uint64((seed * _GOLDEN + 1) % (1 << 64))
        self._positions = np.arange(block_size, dtype=np.uint64)

    def block_tokens(self, hash_id: int) -> list[int]:
        """The ``block_size`` token ids every request sees for ``hash_id``."""
        return self._tokens(np.asarray([hash_id], dtype=np.uint64), tail=None).tolist()

    def prompt_token_ids(self, request: TraceRequest) -> list[int]:
        """``input_length`` token ids: one fixed block per full hash-id block, a unique tail.

        Full blocks beyond ``len(hash_ids)`` (a trace whose ids do not cover its input) are
        part of the unique tail.
        """
        num_full = min(request.input_length // self.block_size, len(request.hash_ids))
        ids = np.asarray(request.hash_ids[:num_full], dtype=np.uint64)
        tail_len = request.input_length - num_full * self.block_size
        return self._tokens(ids, tail=(request.index, tail_len)).tolist()

    def _tokens(self, ids: np.ndarray, tail: tuple[int, int] | None) -> np.ndarray:
        keys = ((ids << np.uint64(_POS_BITS))[:, None] | self._positions[None, :]).ravel()
        if tail is not None and tail[1] > 0:
            index, length = tail
            base = _TAIL_DOMAIN | (np.uint64(index) << np.uint64(_TAIL_POS_BITS))
            keys = np.concatenate([keys, base | np.arange(length, dtype=np.uint64)])
        return _splitmix64(keys ^ self._salt) % np.uint64(self.vocab_size)


def check_hash_coverage(requests: Sequence[TraceRequest], block_size: int) -> int:
    """Requests whose ``len(hash_ids) != ceil(input_length / block_size)`` (0 for Mooncake
    at 512: a non-zero count usually means the wrong ``--block-size``)."""
    return sum(1 for r in requests if len(r.hash_ids) != -(-r.input_length // block_size))
