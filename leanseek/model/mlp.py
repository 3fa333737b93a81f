"""SwiGLU feed-forward: the dense layers, and DeepSeekMoE's shared experts (one SwiGLU of width n_shared x Ie)."""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
