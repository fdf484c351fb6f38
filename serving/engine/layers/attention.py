"""Paged attention over a block-structured KV cache, in plain PyTorch (SDPA).

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0 = K,
1 = V). Token position ``p`` of a sequence lives in block ``block_ids[p // block_size]`` at
offset ``p % block_size``; its flat slot is ``block * block_size + offset``. Seen as rows of
``block_size * num_kv_heads * head_dim`` values, block ``b``'s K is row ``b`` and its V is row
``num_blocks + b``: attention gathers whole blocks with one ``index_select`` over those rows.

The step's tokens are flattened as ``[decode tokens (one per seq) | prefill chunk 0 | ...]``.
Owns the per-step index tensors (``AttentionMetadata``) and the attention math; no weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence's share of the flattened step: tokens at ``start_pos .. start_pos+n-1``."""

    start_pos: int
    num_tokens: int
    block_ids: Sequence[int]


@dataclass(slots=True)
class PrefillChunk:
    """A run of ``num_tokens`` > 1 new tokens of one sequence, at ``token_start`` in the batch.

    With cached context (``start_pos > 0``), ``kv_rows`` lists the K rows then the V rows of the
    blocks covering positions ``[0, start_pos + num_tokens)``, and ``mask[i, j]`` is
    ``j <= start_pos + i``.
    """

    token_start: int
    num_tokens: int
    start_pos: int
    kv_rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionMetadata:
    """Index tensors for one step, built once and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    # [2 * B * max_blocks] int64: K rows then V rows of each decode's blocks, padded with block 0
    decode_kv_rows: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillChunk]


def make_attn_metadata(
    spans: Sequence[SeqSpan], block_size: int, num_blocks: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Build ``(metadata, positions[T])``. Spans with one token must come first (decodes)."""
    slots: list[int] = []
    positions: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillChunk] = []
    for span in spans:
        start, end = span.start_pos, span.start_pos + span.num_tokens
        num_used = -(-end // block_size)
        if len(span.block_ids) < num_used:
            raise ValueError(
                f"{len(span.block_ids)} blocks of {block_size} cannot hold positions up to {end}"
            )
        if max(span.block_ids[:num_used]) >= num_blocks or min(span.block_ids[:num_used]) < 0:
            raise ValueError(f"block ids {list(span.block_ids)} outside [0, {num_blocks})")
        if span.num_tokens == 1:
            if prefills:
                raise ValueError("decode spans (one token) must precede prefill spans")
            decode_tables.append(list(span.block_ids[:num_used]))
            decode_lens.append(end)
        else:
            chunk = PrefillChunk(len(slots), span.num_tokens, start)
            if start > 0:
                chunk.kv_rows = _kv_rows([list(span.block_ids[:num_used])], num_blocks, device)
                query_pos = torch.arange(start, end, device=device)
                chunk.mask = torch.arange(end, device=device)[None, :] <= query_pos[:, None]
            prefills.append(chunk)
        for idx in range(start // block_size, num_used):
            lo, hi = max(start, idx * block_size), min(end, (idx + 1) * block_size)
            base = (span.block_ids[idx] - idx) * block_size
            slots.extend(range(base + lo, base + hi))
        positions.extend(range(start, end))
    decode_kv_rows = decode_mask = None
    if decode_tables:
        max_blocks = max(len(t) for t in decode_tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
        decode_kv_rows = _kv_rows(padded, num_blocks, device)
        lens = torch.tensor(decode_lens, dtype=torch.int64, device=device)
        arange = torch.arange(max_blocks * block_size, device=device)
        decode_mask = (arange[None, :] < lens[:, None])[:, None, None, :]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decode_tokens=len(decode_tables),
        decode_kv_rows=decode_kv_rows,
        decode_mask=decode_mask,
        prefills=prefills,
    )
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


def _kv_rows(tables: list[list[int]], num_blocks: int, device: torch.device) -> torch.Tensor:
    """K rows (the block ids), then V rows (``num_blocks`` + block ids), flattened."""
    k_rows = [b for table in tables for b in table]
    return torch.tensor(k_rows + [num_blocks + b for b in k_rows], device=device)


def _gather_blocks(kv_cache: torch.Tensor, kv_rows: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Blocks' K and V as ``[2, num_seqs, tokens, num_kv_heads, head_dim]`` (a copy)."""
    num_blocks, _, num_kv_heads, head_dim = kv_cache.shape[1:]
    rows = kv_cache.view(2 * num_blocks, -1).index_select(0, kv_rows)
    return rows.view(2, num_seqs, -1, num_kv_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write the new ``k``/``v`` ``[T, Hkv, D]`` into ``kv_cache``, attend, return ``[T, Hq, D]``.

    NOTE: decodes run as one batched SDPA call over each sequence's gathered blocks (padding
    masked); prefill chunks run one SDPA call each, causal, offset by their cached context.
    """
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    flat = kv_cache.view(2, num_slots, kv_cache.shape[3], kv_cache.shape[4])
    flat[0].index_copy_(0, meta.slot_mapping, k)
    flat[1].index_copy_(0, meta.slot_mapping, v)
    outputs: list[torch.Tensor] = []
    num_decode = meta.num_decode_tokens
    if num_decode:
        outputs.append(_decode_attention(q[:num_decode], kv_cache, meta, scale))
    for chunk in meta.prefills:
        span = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        outputs.append(_prefill_attention(q[span], k[span], v[span], kv_cache, chunk, scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per sequence; the query heads sharing a KV head act as that head's queries."""
    assert meta.decode_kv_rows is not None
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    kv = _gather_blocks(kv_cache, meta.decode_kv_rows, num_seqs).transpose(2, 3)
    grouped_q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped_q, kv[0], kv[1], attn_mask=meta.decode_mask, scale=scale
    )
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    query = q.transpose(0, 1)[None]
    if chunk.kv_rows is None:
        key, value = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        seq_len = chunk.start_pos + chunk.num_tokens
        kv = _gather_blocks(kv_cache, chunk.kv_rows, 1)[:, :, :seq_len].transpose(2, 3)
        out = F.scaled_dot_product_attention(
            query, kv[0], kv[1], attn_mask=chunk.mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)
