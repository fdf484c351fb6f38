"""Triton kernels for the CUDA path: paged attention in place, fused rotary + KV store, fused
residual add + RMSNorm, SiLU-and-mul. Imported only when the engine runs on CUDA (or under
``TRITON_INTERPRET=1`` in tests); ``ops.TorchOps`` is the reference each one must match.

Rounding follows Hugging Face's operation order where it is cheap to do so (products and sums
rounded to the model dtype where transformers rounds them), so bfloat16 results stay close to
the PyTorch path; float32 dots use IEEE precision (no TF32).
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
        sms = _num_sms(q.device.index or 0) if q.device.type == "cuda" else _num_sms(0)
        num_splits = num_kv_splits(num_programs, batch.max_seq_len, sms)
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


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    q_out_ptr,
    k_out_ptr,
    kv_ptr,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_qo,
    stride_ko,
    stride_kb,
    stride_kkv,
    stride_ks,
    stride_kh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One token: rotate its q and k heads (rotate-half RoPE), write q and k out, k and v to
    the token's cache slot (skipped for slot < 0)."""
    t = tl.program_id(0).to(tl.int64)
    head_dim = 2 * HALF
    heads = tl.arange(0, HEADS_P)
    halves = tl.arange(0, HALF_P)
    half_valid = halves < HALF
    cos = tl.load(cos_ptr + t * stride_cos + halves, mask=half_valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + HALF + halves, mask=half_valid, other=0.0)
    sin = sin.to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    row = qkv_ptr + t * stride_qkv
    offs = heads[:, None] * head_dim + halves[None, :]
    # q heads
    q_mask = (heads < NUM_HEADS)[:, None] & half_valid[None, :]
    x1 = tl.load(row + offs, mask=q_mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + offs + HALF, mask=q_mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    y2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    q_row = q_out_ptr + t * stride_qo
    tl.store(q_row + offs, y1.to(dtype), mask=q_mask)
    tl.store(q_row + offs + HALF, y2.to(dtype), mask=q_mask)
    kv_mask = (heads < NUM_KV_HEADS)[:, None] & half_valid[None, :]
    k_row = row + NUM_HEADS * head_dim
    x1 = tl.load(k_row + offs, mask=kv_mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_row + offs + HALF, mask=kv_mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    y2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    k_out = k_out_ptr + t * stride_ko
    tl.store(k_out + offs, y1.to(dtype), mask=kv_mask)
    tl.store(k_out + offs + HALF, y2.to(dtype), mask=kv_mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dest = kv_ptr + (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks
        cache_offs = heads[:, None] * stride_kh + halves[None, :]
        tl.store(dest + cache_offs, y1.to(dtype), mask=kv_mask)
        tl.store(dest + cache_offs + HALF, y2.to(dtype), mask=kv_mask)
        v_row = k_row + NUM_KV_HEADS * head_dim
        v1 = tl.load(v_row + offs, mask=kv_mask, other=0.0)
        v2 = tl.load(v_row + offs + HALF, mask=kv_mask, other=0.0)
        tl.store(dest + stride_kkv + cache_offs, v1, mask=kv_mask)
        tl.store(dest + stride_kkv + cache_offs + HALF, v2, mask=kv_mask)


def rotary_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qkv [T, (Hq + 2 Hkv) * D]`` -> rotated ``q [T, Hq, D]`` and ``k [T, Hkv, D]``; rotated
    k and v stored at ``slot_mapping`` in ``kv_cache`` (one layer; slot -1: not stored).
    ``cos``/``sin`` ``[T, 1, D]`` as ``RotaryEmbedding`` returns them (sin's first half
    negated)."""
    num_tokens = qkv.shape[0]
    head_dim = kv_cache.shape[-1]
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q, k
    _rotary_cache_kernel[(num_tokens,)](
        qkv,
        cos,
        sin,
        slot_mapping,
        q,
        k,
        kv_cache,
        qkv.stride(0),
        cos.stride(0),
        sin.stride(0),
        q.stride(0),
        k.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_P=triton.next_power_of_2(max(num_heads, num_kv_heads)),
        HALF=head_dim // 2,
        HALF_P=triton.next_power_of_2(head_dim // 2),
        BLOCK_SIZE=kv_cache.shape[2],
        num_warps=4,
    )
    return q, k


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: ``r = x + res`` (rounded to the dtype), ``out = w * (r * rsqrt(mean(r^2) + eps))``
    with float32 statistics and the normalized value rounded before the weight multiply."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    variance = tl.sum(x * x, 0) / n_cols
    normed = (x * (1.0 / tl.sqrt(variance + eps))).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(dtype), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; without ``residual``: ``(rms_norm(x), x)``."""
    num_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if num_rows == 0:
        return out, res_out
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(num_rows,)](
        x,
        res,
        weight,
        out,
        res_out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        n_cols,
        eps,
        HAS_RES=residual is not None,
        BLOCK=triton.next_power_of_2(n_cols),
        num_warps=8 if n_cols >= 2048 else 4,
    )
    return out, res_out


@triton.jit
def _silu_and_mul_kernel(in_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2 I]`` (gate columns first) -> ``[T, I]``."""
    num_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty((num_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(n_cols))
    grid = (num_rows, triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), n_cols, BLOCK=block)
    return out
