"""SwiGLU feed-forward: the dense layers, and DeepSeekMoE's shared experts (one SwiGLU of width n_shared x Ie)."""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


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
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.limit:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.down_proj(F.silu(gate) * up)
