"""The few fused steps of a decoder layer, in two implementations with one signature.

``TorchOps`` is plain PyTorch in Hugging Face's operation order (CPU, and the reference);
``TritonOps`` runs the same steps as fused Triton kernels on CUDA (``triton_kernels``; attention
in ``triton_attention``): one kernel each for residual add + RMSNorm, rotary + KV store,
SiLU-and-mul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.engine.layers.attention import AttentionMetadata, store_kv
from serving.engine.layers.norm import rms_norm
from serving.engine.layers.rotary import apply_rotary


class TorchOps:
    """Reference steps; bit-identical to the unfused layer code on CPU."""

    name = "torch"

    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(residual + x), residual + x)``; no ``residual``: ``(rms_norm(x), x)``."""
        if residual is not None:
            x = residual + x
        return rms_norm(x, weight, eps), x

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rotary_and_cache(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        num_heads: int,
        num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate q and k of ``qkv [T, (Hq + 2 Hkv) * D]``, store k and v; return q, k, v."""
        head_dim = kv_cache.shape[-1]
        qkv = qkv.view(qkv.shape[0], -1, head_dim)
        num_qk = num_heads + num_kv_heads
        # q and k heads rotate together: elementwise, so identical to rotating each alone.
        qk = apply_rotary(qkv[:, :num_qk], cos, sin)
        q, k, v = qk[:, :num_heads], qk[:, num_heads:], qkv[:, num_qk:]
        store_kv(k, v, kv_cache, attn_metadata)
        return q, k, v


class TritonOps:
    """The same steps as Triton kernels (CUDA)."""

    name = "triton"

    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from serving.engine.layers import triton_kernels

        return triton_kernels.add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        from serving.engine.layers import triton_kernels

        return triton_kernels.silu_and_mul(gate_up)

    @staticmethod
    def rotary_and_cache(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        num_heads: int,
        num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One kernel: q and k rotated, k and v stored; v is a view of ``qkv``."""
        from serving.engine.layers import triton_kernels

        q, k = triton_kernels.rotary_and_cache(
            qkv, cos, sin, kv_cache, attn_metadata.slot_mapping, num_heads, num_kv_heads
        )
        head_dim = kv_cache.shape[-1]
        v = qkv.view(qkv.shape[0], -1, head_dim)[:, num_heads + num_kv_heads :]
        return q, k, v


Ops = type[TorchOps] | type[TritonOps]
