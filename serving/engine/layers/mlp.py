"""SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``, gate and up in one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine.layers.ops import Ops, TorchOps


class SwiGLUMLP(nn.Module):
    """``gate_up_proj`` holds the gate rows, then the up rows (``shard_sizes``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False) -> None:
        super().__init__()
        self.shard_sizes = (intermediate_size, intermediate_size)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, ops: Ops = TorchOps) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
        return F.linear(ops.silu_and_mul(gate_up), self.down_proj.weight, self.down_proj.bias)
