"""Matrix products for decoding on a CPU.

A decode step multiplies one row (or a few) by each weight matrix. PyTorch's CPU matmul is slow at these sizes and
uses one thread: the tiny model's 256 x 4096 output head takes ~155 us a row on a 2-core AMD EPYC, with 1 thread
or 2. Written as a broadcast multiply and a sum, the same product is a reduction that torch.compile's C++ backend
(inductor) vectorises, splits over the threads and fuses with its neighbours: ~35 us. So inside a compiled graph on
a CPU, products with at most ROWS rows take that form (the compiled forward of a batch-1 decode step of the tiny
model: 1.00 -> 0.55 ms, measured side by side); eager code and larger products keep the library matmul (eagerly,
the broadcast would materialise a [rows, n, k] temporary).
"""

import torch
import torch.nn.functional as F
from torch import nn

ROWS = 4  # up to here the reduction is faster; at 8 rows the two are even, past it the library's blocked GEMM wins


def _as_reduction(a: torch.Tensor, rows: int) -> bool:
    return a.device.type == "cpu" and rows <= ROWS and torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias: x [..., k], weight [n, k] -> [..., n]."""
    if _as_reduction(x, x.numel() // max(x.shape[-1], 1)):
        return (x.unsqueeze(-2) * weight).sum(-1)
    return F.linear(x, weight)


def matmul(a: torch.Tensor, b: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """a @ b for a [..., m, k], b [..., k, n] (batch dimensions broadcast). rows: how many tokens' rows of a share
    b (default m); attention's m is tokens x heads, and its heads read the same cached entries, as one token's
    rows would."""
    if _as_reduction(a, a.shape[-2] if rows is None else rows):
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return a @ b


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose products take `linear`'s compiled-decode form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias
