"""Manifold-constrained hyper-connections (mHC), DeepSeek-V4 report section 2.2 (Xie et al., 2026).

A V4 model carries hc_mult residual streams per token instead of one: [B, T, n, d]. Before each attention or MoE
sub-layer the streams are collapsed into its input by weights `pre`; its output is spread back over the streams by
weights `post`, and the streams themselves are mixed by an n x n matrix `comb`. All three are computed per token from
the (RMS-normalised, flattened) streams by one small linear map. `comb` is projected onto the doubly stochastic
matrices (rows and columns summing to 1) by Sinkhorn-Knopp iterations, so mixing can neither amplify nor vanish the
residual signal however deep the stack: that is the "manifold constraint". The hyper head collapses the streams
once more before the final norm and the output head.

The mixing runs in float32 whatever the model's dtype, as DeepSeek's reference code and transformers keep it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def _normed_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (no weight) of the flattened streams [B, T, n * d], times fn^T, in float32. The norm's scale is
    applied to the few outputs rather than the wide input (the same product; DeepSeek's code does so too)."""
    flat = streams.flatten(-2).float()
    ms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1]
    return F.linear(flat, fn.float()) * torch.rsqrt(ms + eps)


def _axes(iters: int) -> list[int]:
    """The axis of each Sinkhorn-Knopp normalisation: columns first, then rows and columns alternately."""
    return [-2] + [-1, -2] * (iters - 1)


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp normalisations with a hand-written backward: each step x = y / (sum y + eps) along one axis
    passes back g -> (g - sum(g x)) / (sum y + eps), four operations where autograd's division takes about twice as
    many (a layer's mHC would otherwise spend most of its time in these small tensors' bookkeeping)."""

    @staticmethod
    def forward(ctx, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.dims = _axes(iters)
        saved = []
        for dim in ctx.dims:
            total = comb.sum(dim, keepdim=True) + eps
            comb = comb / total
            saved += [comb, total]
        ctx.save_for_backward(*saved)
        return comb

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        for k in reversed(range(len(ctx.dims))):
            out, total = saved[2 * k], saved[2 * k + 1]
            grad = (grad - (grad * out).sum(ctx.dims[k], keepdim=True)) / total
        return grad, None, None


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project positive matrices [..., n, n] towards the doubly stochastic ones: normalise the columns, then
    alternate rows and columns, iters column normalisations in all (the order transformers and DeepSeek use)."""
    if torch.is_grad_enabled():
        return _Sinkhorn.apply(comb, iters, eps)
    # decoding: the same steps in place, three operations each (a decode step runs hundreds of these on tiny
    # tensors, so their count is their cost)
    comb = comb.clone()
    eps = comb.new_tensor(eps)  # a Python number would be wrapped into a new tensor at every step
    for dim in _axes(iters):
        comb.div_(comb.sum(dim, keepdim=True).add_(eps))
    return comb


class HyperConnection(nn.Module):
    """The mHC around one sub-layer: from streams [B, T, n, d], the sub-layer's input (collapsed by `pre`), and
    `merge` to fold its output back in (Eqs. of report section 2.2: x' = post * F(pre . x) + comb^T x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = self.n = cfg.hc_mult
        self.iters, self.hc_eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * cfg.hidden_size))  # rows: pre (n), post (n), comb (n*n)
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))  # one scale each for pre, post and comb

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, T, n, d] -> (the sub-layer input [B, T, d], post [B, T, n], comb [B, T, n, n])."""
        n = self.n
        pre, post, comb = _normed_mixes(streams, self.fn, self.norm_eps).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.unbind(0)
        pre = torch.sigmoid(pre * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post * s_post + post_b)
        comb = torch.softmax(comb.unflatten(-1, (n, n)) * s_comb + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(-2).to(streams.dtype)
        return collapsed, post, comb

    @staticmethod
    def merge(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams: stream k = post_k * out + sum_j comb_jk * stream j (comb is not symmetric: the sum runs
        over its first index)."""
        dtype = streams.dtype
        return (comb.to(dtype).transpose(-1, -2) @ streams).addcmul_(post.to(dtype).unsqueeze(-1), out.unsqueeze(-2))


class HyperHead(nn.Module):
    """Collapses the streams [B, T, n, d] into one hidden state [B, T, d] before the final norm (learned `pre` only)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.hc_mult
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = _normed_mixes(streams, self.hc_fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(-2).to(streams.dtype)
