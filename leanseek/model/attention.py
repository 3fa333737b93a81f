"""Multi-head Latent Attention (MLA), V3 report section 2.1.1, Eqs. 1-11.

Keys and values are compressed into one latent c^KV per token (Eq. 1); a separate small key k^R carries position
through RoPE and is shared by all heads (Eq. 3). Only (c^KV, k^R) need caching: kv_lora_rank + qk_rope_head_dim
values per token per layer.

Two forms of the same function:
- expanded (`forward`): up-project the latent into per-head keys and values and run scaled_dot_product_attention.
  For training and prefill.
- absorbed (`forward_absorbed`): fold W^UK into the query and W^UV into the output, and attend over the cached
  latent directly, never materialising per-head keys or values. For decoding from a latent cache.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear, matmul
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm without rms_norm_eps


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.dn, self.dr, self.dv = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.dc = cfg.kv_lora_rank
        qk = self.dn + self.dr
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, H * qk, bias=False)
        else:  # Eqs. 6-7: queries through their own low-rank bottleneck (saves activation memory in training)
            self.q_a_proj = Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, bias=False)
        # rows [0, dc) are W^DKV (Eq. 1), rows [dc, dc + dr) are W^KR (Eq. 3)
        self.kv_a_proj_with_mqa = Linear(d, self.dc + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.dc, LATENT_NORM_EPS)
        # per head h: rows [h(dn+dv), h(dn+dv)+dn) are W^UK_h (Eq. 2), the next dv rows W^UV_h (Eq. 5)
        self.kv_b_proj = Linear(self.dc, H * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(H * self.dv, d, bias=False)  # Eq. 11
        self.scale = softmax_scale(cfg)

    def queries(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [q^C; q^R] [B, T, H, dn + dr], q^R rotated (Eqs. 6-9)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.n_heads, self.dn + self.dr))
        # in place: the projection's backward needs its input, not its output, and this saves a concatenation
        q[..., self.dn:] = apply_rope(q[..., self.dn:], rope.unsqueeze(-2))
        return q

    def latents(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> what a cache holds: normalised c^KV [B, T, dc] and rotated k^R [B, T, dr] (Eqs. 1, 3).

        The RMSNorm touches the latent only; k^R is split off before it."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.dc, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, rope)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Expanded causal self-attention over x [B, T, d] -> [B, T, d]."""
        B, T, _ = x.shape
        H, dn, dr, dv = self.n_heads, self.dn, self.dr, self.dv
        q = self.queries(x, rope)
        c_kv, k_pe = self.latents(x, rope)
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, dn + dv)).split([dn, dv], dim=-1)  # Eqs. 2, 5
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, dr)], dim=-1)  # Eq. 4: [k^C; k^R]
        # CPU and GPU fused kernels want equal q/k and v head sizes: zero-pad the smaller (scores are unchanged)
        width = max(dn + dr, dv)
        q, k, v = ((F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t).transpose(1, 2)
                   for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # Eq. 10
        return self.o_proj(o[..., :dv].transpose(1, 2).flatten(2))

    def forward_absorbed(self, x: torch.Tensor, rope: torch.Tensor, kv: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from the new tokens x [B, T, d] over cached latents kv [B, S, dc + dr] = [c^KV; k^R] per position
        (a cache that already holds x's own latents at its last T positions).

        bias: additive attention mask broadcastable to [B, 1, T, S] (0 where a query may attend, -inf where not);
        None means causal, with the T queries at positions S-T .. S-1. Returns [B, T, d].

        Every head's query is [q^C W^UK_h; q^R], so one batched matmul against [c^KV; k^R] gives all the scores
        (Eq. 10 with Eqs. 2 and 4 folded in), and the values are c^KV itself until W^UV_h and W^O (Eqs. 5, 11).
        """
        B, T, _ = x.shape
        S, H, dn, dc = kv.shape[1], self.n_heads, self.dn, self.dc
        w = self.kv_b_proj.weight.view(H, dn + self.dv, dc)
        q = self.queries(x, rope).view(B * T, H, dn + self.dr).transpose(0, 1)  # [H, BT, dn + dr]
        q_latent = matmul(q[..., :dn], w[:, :dn])  # [H, BT, dc]: W^UK absorbed into the query
        q = torch.cat([q_latent, q[..., dn:]], dim=-1).view(H, B, T, -1).transpose(0, 1)  # [B, H, T, dc + dr]
        scores = matmul(q.reshape(B, H * T, -1), kv.transpose(1, 2)).view(B, H, T, S).mul_(self.scale)
        if bias is None:
            bias = torch.full((T, S), float("-inf"), device=x.device).triu_(S - T + 1)
        probs = scores.float().add_(bias).softmax(dim=-1).to(x.dtype).view(B, H * T, S)
        o_latent = matmul(probs, kv[..., :dc]).view(B, H, T, dc).transpose(0, 1).reshape(H, B * T, dc)
        o = matmul(o_latent, w[:, dn:].transpose(1, 2))  # [H, BT, dv]: W^UV absorbed before W^O
        return self.o_proj(o.transpose(0, 1).reshape(B, T, H * self.dv))
