"""SwiGLU feed-forward: the dense layers, and DeepSeekMoE's shared experts (one SwiGLU of width n_shared x Ie)."""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) * up; with a limit (DeepSeek-V4's swiglu_limit), gate clipped from above and up to +-limit."""
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); with a limit (DeepSeek-V4's swiglu_limit), gate(x) clipped from above and up(x)
    to +-limit."""

    def __init__(self, dim: int, hidden: int, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))
