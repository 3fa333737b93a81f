"""Multi-head Latent Attention (MLA), V3 report section 2.1.1, Eqs. 1-11.

Keys and values are compressed into one latent c^KV per token (Eq. 1); a separate small key k^R carries position
through RoPE and is shared by all heads (Eq. 3). Only (c^KV, k^R) need caching: kv_lora_rank + qk_rope_head_dim
values per token per layer.

Two forms of the same function:
- expanded (`forward`): up-project the latent into per-head keys and values and run scaled_dot_product_attention.
  For training and prefill.
- absorbed (`forward_absorbed`): fold W^UK into the query and W^UV into the output, and attend over the cached
  latent directly, never materialising per-head keys or values. For decoding from a latent cache.

With DeepSeek-V3.2's sparse attention (cfg.index_n_heads > 0) a lightning indexer (indexer.py) narrows, in both
forms, the keys each query attends to down to its index_topk best.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .indexer import Indexer
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
        self.indexer = Indexer(cfg) if cfg.sparse_attention else None

    def query_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> the normalised compressed query c^Q [B, T, q_lora_rank] (Eq. 6)."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def queries(self, x: torch.Tensor, rope: torch.Tensor, q_latent: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] -> [q^C; q^R] [B, T, H, dn + dr], q^R rotated (Eqs. 6-9). q_latent: c^Q if at hand."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.query_latent(x) if q_latent is None else q_latent)
        q = q.unflatten(-1, (self.n_heads, self.dn + self.dr))
        # in place: the projection's backward needs its input, not its output, and this saves a concatenation
        q[..., self.dn:] = apply_rope(q[..., self.dn:], rope.unsqueeze(-2))
        return q

    def latents(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> what a cache holds: normalised c^KV [B, T, dc] and rotated k^R [B, T, dr] (Eqs. 1, 3).

        The RMSNorm touches the latent only; k^R is split off before it."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.dc, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, rope)

    def cache_entry(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> what a cache holds per position [B, T, dc + dr (+ index_head_dim)]: [c^KV; k^R], and with
        sparse attention the indexer's key after them."""
        parts = [*self.latents(x, rope)] + ([self.indexer.keys(x, rope)] if self.indexer is not None else [])
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, index_losses: list | None = None,
                dense: bool = False) -> torch.Tensor:
        """Expanded causal self-attention over x [B, T, d] -> [B, T, d].

        With sparse attention: dense attends to every earlier token (the indexer's warm-up), and index_losses, when
        given, gets the indexer's KL loss against this attention (index_kl)."""
        B, T, _ = x.shape
        H, dn, dr, dv = self.n_heads, self.dn, self.dr, self.dv
        q_latent = self.query_latent(x) if self.indexer is not None else None
        q = self.queries(x, rope, q_latent)
        c_kv, k_pe = self.latents(x, rope)
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, dn + dv)).split([dn, dv], dim=-1)  # Eqs. 2, 5
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, dr)], dim=-1)  # Eq. 4: [k^C; k^R]
        # CPU and GPU fused kernels want equal q/k and v head sizes: zero-pad the smaller (scores are unchanged)
        width = max(dn + dr, dv)
        q, k, v = ((F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t).transpose(1, 2)
                   for t in (q, k, v))
        if self.indexer is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # Eq. 10
            return self.o_proj(o[..., :dv].transpose(1, 2).flatten(2))
        keep = torch.ones(T, T, dtype=torch.bool, device=x.device).tril_()
        if dense or T <= self.indexer.topk:  # the warm-up, or every earlier token is among the best index_topk
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            with torch.no_grad():  # a selection: no gradient reaches the indexer through it
                keep = self.indexer.select(self.indexer.scores(x, q_latent, rope, self.indexer.keys(x, rope)), keep)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.unsqueeze(1), scale=self.scale)
        if index_losses is not None:
            index_losses.append(self.index_kl(x, q_latent, rope, q, k, keep))
        return self.o_proj(o[..., :dv].transpose(1, 2).flatten(2))

    def index_kl(self, x: torch.Tensor, q_latent: torch.Tensor, rope: torch.Tensor, q: torch.Tensor,
                 k: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The indexer's training loss (V3.2-Exp report section 2.2): per query, KL(p || softmax(I)) over the keys
        it attends to (`keep`, [B, T, T] or [T, T]: every earlier one in the dense warm-up, the selected ones in
        sparse training), where p is this attention's probabilities summed over heads and L1-normalised. The
        indexer's inputs are detached, so the loss trains the indexer only (and the language-model loss never does).
        q, k: [B, H, T, width] as attention used them. Returns the mean over queries."""
        with torch.no_grad():
            logits = matmul(q, k.transpose(-1, -2)).float().mul_(self.scale).masked_fill_(~keep.unsqueeze(-3),
                                                                                           float("-inf"))
            p = logits.softmax(-1).sum(1)
            p = p / p.sum(-1, keepdim=True)  # [B, T, T]
        x, q_latent = x.detach(), q_latent.detach()
        scores = self.indexer.scores(x, q_latent, rope, self.indexer.keys(x, rope))
        log_q = scores.masked_fill(~keep, float("-inf")).log_softmax(-1)
        kl = torch.where(keep & (p > 0), p * (p.clamp_min(1e-30).log() - log_q), 0.0)
        return kl.sum(-1).mean()

    def forward_absorbed(self, x: torch.Tensor, rope: torch.Tensor, kv: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from the new tokens x [B, T, d] over cached entries kv [B, S, dc + dr (+ index_head_dim)] (see
        cache_entry; a cache that already holds x's own at its last T positions).

        bias: additive attention mask broadcastable to [B, 1, T, S] (0 where a query may attend, -inf where not);
        None means causal, with the T queries at positions S-T .. S-1. Returns [B, T, d].

        Every head's query is [q^C W^UK_h; q^R], so one batched matmul against [c^KV; k^R] gives all the scores
        (Eq. 10 with Eqs. 2 and 4 folded in), and the values are c^KV itself until W^UV_h and W^O (Eqs. 5, 11).
        """
        B, T, _ = x.shape
        S, H, dn, dc = kv.shape[1], self.n_heads, self.dn, self.dc
        w = self.kv_b_proj.weight.view(H, dn + self.dv, dc)
        kv, index_keys = kv[..., :dc + self.dr], kv[..., dc + self.dr:]
        q_latent = self.query_latent(x) if self.indexer is not None else None
        q = self.queries(x, rope, q_latent).view(B * T, H, dn + self.dr).transpose(0, 1)  # [H, BT, dn + dr]
        q_c = matmul(q[..., :dn], w[:, :dn])  # [H, BT, dc]: W^UK absorbed into the query
        q = torch.cat([q_c, q[..., dn:]], dim=-1).view(H, B, T, -1).transpose(0, 1)  # [B, H, T, dc + dr]
        if bias is None:
            bias = torch.full((T, S), float("-inf"), device=x.device).triu_(S - T + 1)
        if self.indexer is not None and S > self.indexer.topk:
            return self._sparse_absorbed(x, q, kv, bias, self.indexer.scores(x, q_latent, rope, index_keys), w)
        scores = matmul(q.reshape(B, H * T, -1), kv.transpose(1, 2), rows=T).view(B, H, T, S).mul_(self.scale)
        probs = scores.float().add_(bias).softmax(dim=-1).to(x.dtype).view(B, H * T, S)
        o_latent = matmul(probs, kv[..., :dc], rows=T).view(B, H, T, dc).transpose(0, 1).reshape(H, B * T, dc)
        o = matmul(o_latent, w[:, dn:].transpose(1, 2))  # [H, BT, dv]: W^UV absorbed before W^O
        return self.o_proj(o.transpose(0, 1).reshape(B, T, H * self.dv))

    def _sparse_absorbed(self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor,
                         index_scores: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """forward_absorbed over each query's index_topk selected entries only (V3.2 report Eq. 2): they are
        gathered from the cache, so attention costs index_topk, not the context, per query. q [B, H, T, dc + dr]
        absorbed queries, kv [B, S, dc + dr], bias as forward_absorbed's, index_scores [B, T, S]."""
        B, H, T, _ = q.shape
        dc, k = self.dc, self.indexer.topk
        allowed = (bias == 0).expand(B, 1, T, kv.shape[1])[:, 0]
        best = index_scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices  # [B, T, k]
        rows = (best + torch.arange(B, device=x.device).view(B, 1, 1) * kv.shape[1]).flatten()
        picked = kv.reshape(B * kv.shape[1], -1).index_select(0, rows).view(B, T, k, -1)  # whole rows: memcpy
        # a query with fewer than k earlier tokens picks some it may not see: masked again here
        hidden = torch.zeros(B, T, k, device=x.device).masked_fill_(~allowed.gather(-1, best), float("-inf"))
        scores = matmul(q.transpose(1, 2), picked.transpose(-1, -2)).mul_(self.scale)  # [B, T, H, k]
        probs = scores.float().add_(hidden[:, :, None]).softmax(dim=-1).to(x.dtype)
        o_latent = matmul(probs, picked[..., :dc])  # [B, T, H, dc]
        o = matmul(o_latent.permute(2, 0, 1, 3).reshape(H, B * T, dc), w[:, self.dn:].transpose(1, 2))
        return self.o_proj(o.transpose(0, 1).reshape(B, T, H * self.dv))
