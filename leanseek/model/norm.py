"""RMSNorm, as DeepSeek and transformers compute it."""

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), with a hand-written backward that makes three passes over the
    activations where autograd's composite makes about twice as many (memory bandwidth dominates on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        rstd = ms.add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        grad_w = (grad * xhat).flatten(0, -2).sum(0)
        gx = grad * weight
        # d/dx of xhat = rstd * (g - xhat * mean(g * xhat))
        mean_dot = torch.linalg.vecdot(gx, xhat, dim=-1).unsqueeze(-1).div_(x.shape[-1])
        return gx.addcmul_(xhat, mean_dot, value=-1).mul_(rstd), grad_w, None


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps). Below float32 it normalises in float32 and casts back before the weight,
    as transformers does, so bf16 results match it bit for bit."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if not torch.is_grad_enabled():  # inference: the same math without the autograd.Function's overhead
                return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
