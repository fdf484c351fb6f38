"""Triton kernels for the CUDA path: fused rotary + KV store, fused residual add + RMSNorm,
SiLU-and-mul (paged attention: ``triton_attention.py``). Imported only when the engine runs on
CUDA (or under ``TRITON_INTERPRET=1`` in tests); ``ops.TorchOps`` is the reference each one must
match.

Rounding follows Hugging Face's operation order where it is cheap to do so (products and sums
rounded to the model dtype where transformers rounds them), so bfloat16 results stay close to
the PyTorch path; float32 dots use IEEE precision (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
