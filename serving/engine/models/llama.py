"""Llama-family decoder (Llama, Qwen2, Mistral) over flattened tokens and a paged KV cache.

q/k/v and gate/up projections are stored fused (one matmul each); checkpoint tensors load into
their row slices by name. On this path, the fused matmul gives the same bits as separate ones
(each output element is the same dot product); the greedy-vs-transformers tests guard that.
Owns the weights and the forward math; never allocates the KV cache or samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine.layers.attention import AttentionMetadata, paged_attention
from serving.engine.layers.mlp import SwiGLUMLP
from serving.engine.layers.norm import RMSNorm
from serving.engine.layers.ops import Ops, TorchOps
from serving.engine.layers.rotary import RotaryEmbedding
from serving.engine.models.loader import ModelArchConfig

# Fused module -> the checkpoint modules whose rows it stacks, in order.
_FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.shard_sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=arch.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        ops: Ops = TorchOps,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = ops.rotary_and_cache(
            qkv, cos, sin, kv_cache, attn_metadata, self.num_heads, self.num_kv_heads
        )
        out = paged_attention(q, k, v, kv_cache, attn_metadata, self.scale)
        return F.linear(out.reshape(num_tokens, -1), self.o_proj.weight, self.o_proj.bias)


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
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        ops: Ops = TorchOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, residual)`` in, ``(mlp output, residual)`` out: the next step adds them
        (fused with the next norm). The first layer gets ``residual=None``."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        normed, residual = ops.add_rms_norm(hidden, residual, norm1.weight, norm1.eps)
        # Direct .forward calls skip nn.Module.__call__ (hooks) on the per-token hot path.
        attn = self.self_attn.forward(normed, cos, sin, kv_cache, attn_metadata, ops)
        normed, residual = ops.add_rms_norm(attn, residual, norm2.weight, norm2.eps)
        return self.mlp.forward(normed, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids[T], positions[T], attn_metadata, kv_caches, ops) -> hidden[T, H]``;
    ``compute_logits(hidden[n, H]) -> [n, vocab]`` float32.

    With tied embeddings there is no ``lm_head``: logits use ``embed_tokens.weight``.
    """

    def __init__(self, arch: ModelArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch)
        self.lm_head: nn.Linear | None = None
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: Sequence[torch.Tensor],
        ops: Ops = TorchOps,
    ) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.model.embed_tokens.weight)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer.forward(
                hidden, residual, cos, sin, kv_cache, attn_metadata, ops
            )
        norm = self.model.norm
        return ops.add_rms_norm(hidden, residual, norm.weight, norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head if self.lm_head is not None else self.model.embed_tokens
        return F.linear(hidden, head.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the (already allocated) parameters, by name.

        Every checkpoint name the model expects must appear once; unknown names raise.
        """
        targets = _load_targets(self)
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed, never loaded
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: a copy of the embeddings
            if name not in targets:
                raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
            param, rows = targets.pop(name)
            dest = param.data[rows]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
        if targets:
            raise ValueError(f"checkpoint lacks tensors: {', '.join(sorted(targets)[:5])}")


def _load_targets(model: nn.Module) -> dict[str, tuple[torch.Tensor, slice]]:
    """Checkpoint tensor name -> (parameter, rows it fills). Fused parameters get one entry
    per part: ``...self_attn.k_proj.weight`` -> rows of ``...self_attn.qkv_proj.weight``."""
    targets: dict[str, tuple[torch.Tensor, slice]] = {}
    for name, param in model.named_parameters():
        module_path, _, kind = name.rpartition(".")
        owner_path, _, leaf = module_path.rpartition(".")
        parts = _FUSED_PARTS.get(leaf)
        if parts is None:
            targets[name] = (param, slice(None))
            continue
        sizes: tuple[int, ...] = model.get_submodule(owner_path).shard_sizes
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            targets[f"{owner_path}.{part}.{kind}"] = (param, slice(start, start + size))
            start += size
    return targets
