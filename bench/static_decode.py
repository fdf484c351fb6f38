"""The yardstick for the engine's decode step: plain PyTorch, a static KV cache, one CUDA graph.

No engine, no paging, no scheduler: a Llama forward for one new token per sequence written
directly against a Hugging Face ``LlamaForCausalLM``'s weights, with a dense cache
``[layers, 2, batch, kv_heads, max_len, head_dim]`` that SDPA attends in full under a position
mask, greedy argmax fed back as the next input. On CUDA one step (embedding .. logits ..
argmax .. next position) is captured as one graph and replayed; ``time_step_s`` returns the
median seconds per replayed step. This is what "a script with a CUDA graph" costs on the same
GPU, so the engine's step is reported as a ratio against it (``bench/engine.py``).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F


class StaticGraphDecoder:
    """Owns a dense KV cache and static inputs for ``batch`` sequences over ``hf``'s weights."""

    def __init__(self, hf: Any, batch: int, max_len: int) -> None:
        config = hf.config
        self.hf = hf
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        device, dtype = hf.device, hf.dtype
        shape = (len(hf.model.layers), 2, batch, self.num_kv_heads, max_len, self.head_dim)
        self.cache = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.max_len = max_len
        rotary = hf.model.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.graph: torch.cuda.CUDAGraph | None = None

    def start(self, tokens: list[int], positions: list[int]) -> None:
        """Set each sequence's next input token and position (the cache stays as it is)."""
        self.tokens.copy_(torch.tensor(tokens))
        self.positions.copy_(torch.tensor(positions))

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step for every sequence; returns the greedy tokens (also the next input)."""
        hf = self.hf
        hidden = F.embedding(self.tokens, hf.model.embed_tokens.weight)  # [B, H]
        cos, sin = self._rotary(hidden.dtype)
        mask = torch.arange(self.max_len, device=hidden.device)[None, :] <= self.positions[:, None]
        mask = mask[:, None, None, :]  # [B, 1, 1, max_len]
        for i, layer in enumerate(hf.model.layers):
            residual = hidden
            x = _rms_norm(hidden, layer.input_layernorm.weight, self.eps)
            x = self._attention(layer.self_attn, x, cos, sin, self.cache[i], mask)
            hidden = residual + x
            residual = hidden
            x = _rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            hidden = residual + x
        hidden = _rms_norm(hidden, hf.model.norm.weight, self.eps)
        next_tokens = hf.lm_head(hidden).float().argmax(dim=-1)
        self.tokens.copy_(next_tokens)
        self.positions.add_(1)
        return next_tokens

    def _rotary(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None, :]
        return cos, sin

    def _attention(
        self,
        attn: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch = x.shape[0]
        q = attn.q_proj(x).view(batch, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(batch, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(batch, self.num_kv_heads, self.head_dim)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rows = torch.arange(batch, device=x.device)
        cache[0, rows, :, self.positions] = k
        cache[1, rows, :, self.positions] = v
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], cache[0], cache[1], attn_mask=mask, enable_gqa=True
        )
        return attn.o_proj(out.reshape(batch, -1))

    def capture(self) -> None:
        """Capture one step as a CUDA graph (after two eager warm-up steps)."""
        saved = self.tokens.clone(), self.positions.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.tokens.copy_(saved[0])
        self.positions.copy_(saved[1])

    def time_step_s(self, steps: int, repeats: int) -> list[float]:
        """Seconds per step of ``steps`` replays, ``repeats`` times (CUDA events)."""
        assert self.graph is not None, "capture() first"
        start_positions = self.positions.clone()
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            self.positions.copy_(start_positions)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                self.graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3 / steps)
        return times[1:]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def static_graph_step_s(
    hf: Any, prompts: list[list[int]], steps: int, repeats: int
) -> dict[str, float]:
    """Median (and best) seconds per decode step of the static CUDA-graph loop.

    The prompts' own KV is not computed: the cache holds zeros up to each prompt's length, which
    costs the same reads as real values; only timing is reported, not tokens.
    """
    max_len = max(len(p) for p in prompts) + steps + 1
    max_len = -(-max_len // 64) * 64
    decoder = StaticGraphDecoder(hf, len(prompts), max_len)
    decoder.cache.normal_()  # timing on random data, not zeros
    decoder.start([p[-1] for p in prompts], [len(p) for p in prompts])
    decoder.capture()
    times = decoder.time_step_s(steps, repeats)
    del decoder
    torch.cuda.empty_cache()
    return {"median": statistics.median(times), "best": min(times), "repeats": len(times)}
