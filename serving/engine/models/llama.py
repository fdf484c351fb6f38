"""Llama-family decoder (Llama, Qwen2, Mistral) over flattened tokens and a paged KV cache.

Parameter names match the Hugging Face checkpoints (``model.layers.N.self_attn.q_proj.weight``,
``lm_head.weight``), so weights load by name. Owns the weights and the forward math; never
allocates the KV cache or samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from serving.engine.layers.attention import AttentionMetadata, paged_attention
from serving.engine.layers.mlp import SwiGLUMLP
from serving.engine.layers.norm import RMSNorm
from serving.engine.layers.rotary import RotaryEmbedding, apply_rotary
from serving.engine.models.loader import ModelArchConfig


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        bias = arch.attention_bias
        self.q_proj = nn.Linear(arch.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(arch.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(arch.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=arch.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch)
        self.mlp = SwiGLUMLP(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids[T], positions[T], meta, kv_caches) -> hidden[T, H]``;
    ``compute_logits(hidden[n, H]) -> [n, vocab]`` float32."""

    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, kv_cache, meta)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Assign checkpoint tensors by name; every parameter must be covered exactly once."""
        params = dict(self.named_parameters())
        if self.arch.tie_word_embeddings:
            params.pop("lm_head.weight")
        loaded: set[str] = set()
        for name, tensor in weights:
            if name not in params:
                if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                    continue  # tied copy of the embeddings / a recomputed buffer
                raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            _set_param(self, name, tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks tensors: {', '.join(missing[:5])}")
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def _set_param(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = root.get_submodule(module_path)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
