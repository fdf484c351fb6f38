"""Triton paged attention for the CUDA path: the block tables read in place (no gather), the keys
of a sequence split into pieces merged by a second kernel when the batch alone leaves SMs idle.
Imported only when the engine runs on CUDA (or under ``TRITON_INTERPRET=1`` in tests); the torch
backend in ``layers/attention.py`` is the reference it must match.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from serving.engine.layers.attention import PagedBatch

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_tile(
    q, q_pos, m_i, l_i, acc, start, kv_end, table, k_base, scale_log2e,
    stride_kb, stride_kkv, stride_ks, dims, dim_valid,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One key tile ``[start, start + TILE_N)``: scores, causal mask, online-softmax update."""
    pos = start + tl.arange(0, TILE_N)
    pos_valid = pos < kv_end
    blk = tl.load(table + pos // BLOCK_SIZE, mask=pos_valid, other=0).to(tl.int64)
    kv_offs = (blk * stride_kb + (pos % BLOCK_SIZE) * stride_ks)[:, None] + dims[None, :]
    kv_mask = pos_valid[:, None] & dim_valid[None, :]
    k = tl.load(k_base + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(k_base + stride_kkv + kv_offs, mask=kv_mask, other=0.0)
    if IEEE:  # noqa: SIM108 (a branch on a constexpr, resolved at compile time)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    allowed = (pos[None, :] <= q_pos[:, None]) & pos_valid[None, :]
    s = tl.where(allowed, s * scale_log2e, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:  # noqa: SIM108
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    out_ptr,
    kv_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    query_lens_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kkv,
    stride_ks,
    stride_kh,
    stride_bt,
    part_ptr,
    ml_ptr,
    split_len,
    num_tokens,
    num_heads,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One program: ``BLOCK_Q`` new tokens of one sequence x the ``GROUP`` query heads of one KV
    head (``BLOCK_M`` rows, padded), online softmax over key tiles read through the table.

    With ``NUM_SPLITS`` > 1 the keys are cut into ``split_len`` pieces, one program each, and
    each writes its unnormalised sum and its (max, sum of weights) to ``part``/``ml`` for
    ``_combine_splits_kernel`` (flash-decoding): a few long sequences then fill the GPU."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    query_len = tl.load(query_lens_ptr + seq)
    if q_tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < query_len)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM
    io_mask = row_valid[:, None] & dim_valid[None, :]
    q_offs = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0)
    q_pos = seq_len - query_len + tok
    last_tok = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, query_len) - 1
    kv_end = seq_len - query_len + last_tok + 1
    kv_lo = 0
    if NUM_SPLITS > 1:
        kv_lo = split * split_len
        kv_end = tl.minimum(kv_end, kv_lo + split_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    k_base = kv_ptr + kv_head * stride_kh
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if INTERPRET:  # the interpreter's scalars are 1-element arrays, which range() refuses
        start = kv_lo
        while start < kv_end:
            m_i, l_i, acc = _attend_tile(
                q, q_pos, m_i, l_i, acc, start, kv_end, table, k_base, scale_log2e,
                stride_kb, stride_kkv, stride_ks, dims, dim_valid,
                BLOCK_SIZE, TILE_N, IEEE,
            )  # fmt: skip
            start += TILE_N
    else:
        for start in tl.range(kv_lo, kv_end, TILE_N):
            m_i, l_i, acc = _attend_tile(
                q, q_pos, m_i, l_i, acc, start, kv_end, table, k_base, scale_log2e,
                stride_kb, stride_kkv, stride_ks, dims, dim_valid,
                BLOCK_SIZE, TILE_N, IEEE,
            )  # fmt: skip
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:  # part [NUM_SPLITS, T, Hq, HEAD_DIM_P], ml [NUM_SPLITS, T, Hq, 2], float32
        row = (split * num_tokens + q_start + tok) * num_heads + head
        tl.store(part_ptr + row[:, None] * HEAD_DIM_P + dims[None, :], acc, mask=io_mask)
        tl.store(ml_ptr + row * 2, m_i, mask=row_valid)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=row_valid)


# A split holds at least this many keys (fewer: the combine costs more than the parallelism buys).
_MIN_SPLIT_TOKENS = 512
_MAX_SPLITS = 32


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    part_ptr,
    ml_ptr,
    query_start_ptr,
    query_lens_ptr,
    stride_ot,
    stride_oh,
    num_tokens,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
):
    """One program: one new token x one query head; merges the splits' online softmaxes."""
    seq = tl.program_id(0)
    t = tl.program_id(1)
    head = tl.program_id(2)
    if t >= tl.load(query_lens_ptr + seq):
        return
    tok = tl.load(query_start_ptr + seq).to(tl.int64) + t
    splits = tl.arange(0, SPLITS_P)
    split_valid = splits < NUM_SPLITS
    rows = (splits * num_tokens + tok) * num_heads + head
    m = tl.load(ml_ptr + rows * 2, mask=split_valid, other=float("-inf"))
    l_s = tl.load(ml_ptr + rows * 2 + 1, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)  # 0 for an empty split (m = -inf)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM
    acc = tl.load(
        part_ptr + rows[:, None] * HEAD_DIM_P + dims[None, :],
        mask=split_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    total = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_valid,
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    if _INTERPRET or not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_kv_splits(num_programs: int, max_seq_len: int, num_sms: int) -> int:
    """How many pieces to cut each sequence's keys into: enough programs for about two waves
    over the GPU's SMs, each piece at least ``_MIN_SPLIT_TOKENS`` keys; 1 when the batch alone
    fills the GPU or ``max_seq_len`` is unknown (0: a captured CUDA graph's decode)."""
    if max_seq_len <= 0 or num_programs >= num_sms:
        return 1
    wanted = -(-2 * num_sms // num_programs)
    return max(1, min(wanted, max_seq_len // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    num_splits: int | None = None,
) -> None:
    """Write ``out`` rows of ``batch``'s sequences: ``q``/``out`` ``[T, Hq, D]`` (last dim
    contiguous), ``kv_cache`` one layer ``[num_blocks, 2, block_size, Hkv, D]`` (any strides
    with a contiguous last dim). ``num_splits`` (default: ``num_kv_splits``) cuts the keys of
    each sequence into pieces attended in parallel and merged by a second kernel."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    # Decodes: one token a program; chunks: about 64 rows (tokens x query heads) a program.
    block_q = 1 if batch.max_query_len == 1 else max(1, 64 // triton.next_power_of_2(group))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    num_seqs = batch.seq_lens.shape[0]
    num_q_tiles = triton.cdiv(batch.max_query_len, block_q)
    tile_n = max(16, min(64, triton.next_power_of_2(block_size) * 4))
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    if num_splits is None:
        num_programs = num_seqs * num_kv_heads * num_q_tiles
        num_splits = num_kv_splits(num_programs, batch.max_seq_len, _num_sms(q.device.index or 0))
    split_len = 0
    part = ml = out  # placeholders: not read with one split
    if num_splits > 1:
        split_len = triton.cdiv(triton.cdiv(batch.max_seq_len, num_splits), tile_n) * tile_n
        num_tokens = q.shape[0]
        f32 = {"dtype": torch.float32, "device": q.device}
        part = torch.empty((num_splits, num_tokens, num_heads, head_dim_p), **f32)
        ml = torch.empty((num_splits, num_tokens, num_heads, 2), **f32)
    grid = (num_seqs, num_kv_heads, num_q_tiles * num_splits)
    _paged_attention_kernel[grid](
        q,
        out,
        kv_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start,
        batch.query_lens,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        batch.block_tables.stride(0),
        part,
        ml,
        split_len,
        q.shape[0],
        num_heads,
        GROUP=group,
        NUM_SPLITS=num_splits,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        IEEE=q.dtype == torch.float32,
        INTERPRET=_INTERPRET,
        num_warps=4,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_seqs, batch.max_query_len, num_heads)](
            out,
            part,
            ml,
            batch.query_start,
            batch.query_lens,
            out.stride(0),
            out.stride(1),
            q.shape[0],
            num_heads,
            NUM_SPLITS=num_splits,
            SPLITS_P=max(2, triton.next_power_of_2(num_splits)),
            HEAD_DIM=head_dim,
            HEAD_DIM_P=head_dim_p,
            num_warps=4,
        )
