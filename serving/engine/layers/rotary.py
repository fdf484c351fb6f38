"""Rotary position embedding (RoPE) for the "default", "linear" and "llama3" rope types.

Mirrors ``transformers.modeling_rope_utils`` and ``LlamaRotaryEmbedding`` operation by
operation, so cos/sin are bit-identical to Hugging Face's for the same positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from serving.engine.models.loader import RopeScaling


def compute_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32, CPU)."""
    # Explicit CPU device: the model may be built under ``torch.device("meta")``.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope type {scaling.rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency smoothing: long wavelengths scaled by ``factor``, short ones kept."""
    assert s.original_max_position_embeddings is not None
    old_context_len = s.original_max_position_embeddings
    low_freq_wavelen = old_context_len / s.low_freq_factor
    high_freq_wavelen = old_context_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / s.factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin ``[T, 1, head_dim]`` once per step for the step's flattened positions.

    The returned sin carries rotate_half's sign (first half negated), so that
    ``apply_rotary`` needs one ``roll`` instead of slicing, negating and concatenating.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        self.register_buffer(
            "inv_freq", compute_inv_freq(head_dim, theta, scaling), persistent=False
        )

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions[:, None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos[:, None, :], signed_sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]``; same bits as Hugging Face's
    ``x * cos + rotate_half(x) * sin``, since ``(-a) * b == a * (-b)`` exactly."""
    return (x * cos) + (x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)
