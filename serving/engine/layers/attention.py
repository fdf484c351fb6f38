"""Paged attention over the block-major KV pool: metadata, the PyTorch reference, the dispatch.

KV of one layer (a strided view of ``KVPool.tensor``): ``[num_blocks, 2, block_size,
num_kv_heads, head_dim]`` (index 0 = K, 1 = V). Token position ``p`` of a sequence lives in
block ``block_ids[p // block_size]`` at offset ``p % block_size``; its flat slot is
``block * block_size + offset``.

The step's tokens are flattened as ``[decode tokens (one per seq) | prefill chunk 0 | ...]``.
Two backends share one ``AttentionMetadata`` built once per step:

* ``torch`` (CPU, and the reference everywhere): decodes in one SDPA call over each sequence's
  gathered blocks, padded and masked; each prefill chunk in its own SDPA call, causal, and over
  its gathered cached context with an explicit mask when it has one. The indices into the
  layer views and the masks' additive form are built at the first layer and reused by the
  others (``StepRows``): per layer only the copies and SDPA run;
* ``triton`` (CUDA): decodes and chunks with cached context in one launch of a kernel that reads
  the blocks in place through the block table (``triton_attention.paged_attention``), no gather,
  no mask; fresh prefill chunks (no cached context) in SDPA's causal flash kernel.

Owns the per-step index tensors and the attention math; no weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["torch", "triton"]


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence's share of the flattened step: tokens at ``start_pos .. start_pos+n-1``."""

    start_pos: int
    num_tokens: int
    block_ids: Sequence[int]


@dataclass(slots=True)
class PrefillChunk:
    """A run of ``num_tokens`` > 1 new tokens of one sequence, at ``token_start`` in the batch.

    Torch backend with cached context (``start_pos > 0``): ``block_ids`` are the blocks covering
    positions ``[0, start_pos + num_tokens)`` and ``mask[i, j]`` is ``j <= start_pos + i``.
    """

    token_start: int
    num_tokens: int
    start_pos: int
    block_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class PagedBatch:
    """Sequences the Triton kernel attends in place (int32 tensors on the device).

    Sequence ``s`` has ``query_lens[s]`` new tokens at rows ``query_start[s]...`` of the step,
    and attends the first ``seq_lens[s]`` positions (cached context + its new tokens) through
    ``block_tables[s]``. A row with ``seq_lens == 0`` (CUDA-graph padding) produces zeros.
    """

    block_tables: torch.Tensor  # [S, max_blocks]
    seq_lens: torch.Tensor  # [S]
    query_start: torch.Tensor  # [S]
    query_lens: torch.Tensor  # [S]
    max_query_len: int
    # Longest ``seq_lens`` (host); 0 = unknown (a captured CUDA graph's decode): keys unsplit.
    max_seq_len: int = 0


@dataclass(frozen=True, slots=True)
class StepRows:
    """The torch backend's per-step indices into a layer seen as rows (``_rows``), and its masks
    as SDPA's additive float form (0 / -inf, the query's dtype).

    The layers of one pool differ only in their storage offset, so the rows computed for the
    first layer serve every layer of the step; ``key`` (the view's outer strides and the
    query dtype) tells when they do not.
    """

    key: tuple[int, int, torch.dtype]
    store_k: torch.Tensor  # [T] token row of each new token's K
    store_v: torch.Tensor  # [T] ... and of its V
    decode: torch.Tensor | None  # block rows: K of every decode's blocks, then their V
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size]
    chunks: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]  # per prefill: (rows, mask)


@dataclass(slots=True)
class AttentionMetadata:
    """Index tensors for one step, built once and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token (-1: skip)
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    prefills: list[PrefillChunk]
    backend: AttentionBackend = "torch"
    # torch backend: each decode's blocks [B, max_blocks] int64 (padded with block 0) and mask
    decode_block_ids: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size], True = attend
    # triton backend: decodes and chunks with cached context
    paged: PagedBatch | None = None
    # torch backend: row indices and additive masks, built at the first layer (``_step_rows``)
    rows: StepRows | None = None


def host_to_device(
    values: Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A step's host-side indices as a tensor on ``device`` without waiting for the GPU.

    ``torch.tensor(values, device=cuda)`` copies and then synchronizes the stream: the host
    waits for every kernel queued before it, such as a KV onboard's copies that the stream
    waits on, and only then goes on launching the step. A non-blocking copy from pageable
    memory is staged by the driver before it returns and is ordered on the stream.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def make_attn_metadata(
    spans: Sequence[SeqSpan],
    block_size: int,
    num_blocks: int,
    device: torch.device,
    backend: AttentionBackend = "torch",
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Build ``(metadata, positions[T])``. Spans with one token must come first (decodes)."""
    slots: list[int] = []
    positions: list[int] = []
    tables: list[list[int]] = []  # torch: decodes; triton: every paged sequence
    paged_rows: list[tuple[int, int, int]] = []  # (query_start, query_len, seq_len)
    prefills: list[PrefillChunk] = []
    num_decodes = 0
    for span in spans:
        start, end = span.start_pos, span.start_pos + span.num_tokens
        num_used = -(-end // block_size)
        used = list(span.block_ids[:num_used])
        _check_blocks(span, used, num_used, end, block_size, num_blocks)
        token_start = len(slots)
        if span.num_tokens == 1:
            if prefills:
                raise ValueError("decode spans (one token) must precede prefill spans")
            num_decodes += 1
        else:
            chunk = PrefillChunk(token_start, span.num_tokens, start)
            if start > 0 and backend == "torch":
                chunk.block_ids = host_to_device(used, torch.int64, device)
                query_pos = torch.arange(start, end, device=device)
                chunk.mask = torch.arange(end, device=device)[None, :] <= query_pos[:, None]
            prefills.append(chunk)
        if backend == "triton" and (span.num_tokens == 1 or start > 0):
            tables.append(used)
            paged_rows.append((token_start, span.num_tokens, end))
        elif backend == "torch" and span.num_tokens == 1:
            tables.append(used)
            paged_rows.append((token_start, 1, end))
        for idx in range(start // block_size, num_used):
            lo, hi = max(start, idx * block_size), min(end, (idx + 1) * block_size)
            base = (span.block_ids[idx] - idx) * block_size
            slots.extend(range(base + lo, base + hi))
        positions.extend(range(start, end))
    meta = AttentionMetadata(
        slot_mapping=host_to_device(slots, torch.int64, device),
        num_decode_tokens=num_decodes,
        prefills=prefills,
        backend=backend,
    )
    if tables and backend == "torch":
        meta.decode_block_ids, meta.decode_mask = _decode_tables(
            tables, [r[2] for r in paged_rows], block_size, device
        )
    elif tables:
        meta.paged = _paged_batch(tables, paged_rows, device)
    return meta, host_to_device(positions, torch.int64, device)


def _check_blocks(
    span: SeqSpan, used: list[int], num_used: int, end: int, block_size: int, num_blocks: int
) -> None:
    if len(span.block_ids) < num_used:
        raise ValueError(
            f"{len(span.block_ids)} blocks of {block_size} cannot hold positions up to {end}"
        )
    if max(used) >= num_blocks or min(used) < 0:
        raise ValueError(f"block ids {list(span.block_ids)} outside [0, {num_blocks})")


def _decode_tables(
    tables: list[list[int]], lens: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    max_blocks = max(len(t) for t in tables)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    block_ids = host_to_device(padded, torch.int64, device)
    arange = torch.arange(max_blocks * block_size, device=device)
    lens_t = host_to_device(lens, torch.int64, device)
    return block_ids, (arange[None, :] < lens_t[:, None])[:, None, None, :]


def _paged_batch(
    tables: list[list[int]], rows: list[tuple[int, int, int]], device: torch.device
) -> PagedBatch:
    max_blocks = max(len(t) for t in tables)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    columns = list(zip(*rows, strict=True))
    ints = host_to_device([*columns[0], *columns[1], *columns[2]], torch.int32, device)
    ints = ints.view(3, -1)
    return PagedBatch(
        block_tables=host_to_device(padded, torch.int32, device),
        seq_lens=ints[2],
        query_start=ints[0],
        query_lens=ints[1],
        max_query_len=max(columns[1]),
        max_seq_len=max(columns[2]),
    )


def _rows(kv_cache: torch.Tensor, unit: int) -> torch.Tensor:
    """One layer's storage seen as rows of ``unit`` elements, from its first block (a view).

    In a block-major pool a block's K (then V) of one layer is contiguous, so a K/V block
    (``unit = block_size * heads * dim``) or one token's K/V (``unit = heads * dim``) is one row:
    row ``b * (stride(0) // unit) + kv * (stride(1) // unit) [+ offset]``.
    """
    num_rows = (kv_cache.shape[0] - 1) * (kv_cache.stride(0) // unit)
    num_rows += 2 * (kv_cache.stride(1) // unit)
    return kv_cache.as_strided((num_rows, unit), (unit, 1))


def _token_rows(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K rows and the V rows (``unit = heads * dim``) of the flat ``slots``."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    unit = num_kv_heads * head_dim
    k_rows = (slots // block_size) * (kv_cache.stride(0) // unit) + slots % block_size
    return k_rows, k_rows + kv_cache.stride(1) // unit


def _block_rows(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The blocks' K rows, then their V rows (``unit = block_size * heads * dim``), flat."""
    unit = kv_cache[0, 0].numel()
    k_rows = block_ids.reshape(-1) * (kv_cache.stride(0) // unit)
    return torch.cat((k_rows, k_rows + kv_cache.stride(1) // unit))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as SDPA converts it: 0 where True, -inf elsewhere."""
    return torch.where(mask, 0.0, torch.scalar_tensor(-math.inf, dtype=dtype, device=mask.device))


def step_rows(kv_cache: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> StepRows:
    """The step's rows into ``kv_cache`` (a layer view) and its masks, built once per step."""
    key = (kv_cache.stride(0), kv_cache.stride(1), dtype)
    if meta.rows is not None and meta.rows.key == key:
        return meta.rows
    store_k, store_v = _token_rows(kv_cache, meta.slot_mapping)
    decode = decode_mask = None
    if meta.decode_block_ids is not None and meta.decode_mask is not None:
        decode = _block_rows(kv_cache, meta.decode_block_ids)
        decode_mask = _additive(meta.decode_mask, dtype)
    chunks = tuple(
        None
        if c.block_ids is None or c.mask is None
        else (_block_rows(kv_cache, c.block_ids), _additive(c.mask, dtype))
        for c in meta.prefills
    )
    meta.rows = StepRows(key, store_k, store_v, decode, decode_mask, chunks)
    return meta.rows


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the new ``k``/``v`` ``[T, Hkv, D]`` at their flat slots (the reference path)."""
    _store(k, v, kv_cache, *_token_rows(kv_cache, slots))


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> None:
    """``write_kv`` at the step's slots, with the rows computed once for all layers."""
    rows = step_rows(kv_cache, meta, k.dtype)
    _store(k, v, kv_cache, rows.store_k, rows.store_v)


def _store(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
) -> None:
    unit = kv_cache.shape[3] * kv_cache.shape[4]
    rows = _rows(kv_cache, unit)
    rows.index_copy_(0, k_rows, k.reshape(-1, unit))
    rows.index_copy_(0, v_rows, v.reshape(-1, unit))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend ``q [T, Hq, D]`` (new ``k``/``v`` already in ``kv_cache``); return ``[T, Hq, D]``.

    NOTE: torch backend: decodes run as one batched SDPA call over each sequence's gathered
    blocks (padding masked), prefill chunks one SDPA call each, causal, offset by their cached
    context. Triton backend: one kernel launch for every sequence with cached context.
    """
    if meta.backend == "triton":
        return _triton_attention(q, k, v, kv_cache, meta, scale)
    rows = step_rows(kv_cache, meta, q.dtype)
    outputs: list[torch.Tensor] = []
    num_decode = meta.num_decode_tokens
    if num_decode:
        outputs.append(_decode_attention(q[:num_decode], kv_cache, rows, scale))
    for chunk, chunk_rows in zip(meta.prefills, rows.chunks, strict=True):
        span = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        outputs.append(
            _prefill_attention(q[span], k[span], v[span], kv_cache, chunk, chunk_rows, scale)
        )
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    from serving.engine.layers import triton_attention

    out = torch.empty_like(q)
    if meta.paged is not None:
        triton_attention.paged_attention(q, kv_cache, out, meta.paged, scale)
    for chunk in meta.prefills:
        if chunk.start_pos == 0:
            span = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            out[span] = causal_attention(q[span], k[span], v[span], scale)
    return out


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal self-attention of one fresh sequence ``[n, H, D]`` (SDPA; flash on CUDA)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _gather(
    kv_cache: torch.Tensor, rows: torch.Tensor, num_seqs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks at ``rows`` (``_block_rows``), each ``[num_seqs, num_kv_heads,
    tokens, head_dim]`` (one copy)."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    kv = _rows(kv_cache, block_size * num_kv_heads * head_dim).index_select(0, rows)
    kv = kv.view(2, num_seqs, -1, num_kv_heads, head_dim).transpose(2, 3)
    return kv[0], kv[1]


def _decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, rows: StepRows, scale: float
) -> torch.Tensor:
    """One query per sequence; the query heads sharing a KV head act as that head's queries."""
    assert rows.decode is not None
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    key, value = _gather(kv_cache, rows.decode, num_seqs)
    grouped_q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped_q, key, value, attn_mask=rows.decode_mask, scale=scale
    )
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    chunk: PrefillChunk,
    chunk_rows: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    if chunk_rows is None:
        return causal_attention(q, k, v, scale)
    block_rows, mask = chunk_rows
    seq_len = chunk.start_pos + chunk.num_tokens
    key, value = _gather(kv_cache, block_rows, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        key[:, :, :seq_len],
        value[:, :, :seq_len],
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
