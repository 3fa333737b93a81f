"""DeepSeek-V4's hybrid attention (V4 report section 2.3): one shared key-value head, a sliding window of recent
tokens, and compressed entries of the whole past.

Per layer (layer_types): every query attends to the last sliding_window tokens (itself included) and, in a
compressed sparse attention (CSA) layer, to the index_topk compressed entries its lightning indexer picks, or in a
heavily compressed attention (HCA) layer, to every compressed entry complete before it (compressor.py).
- Queries come through a low-rank bottleneck (q_lora_rank, as MLA's), are RMS-normalised per head, and carry RoPE
  on their last qk_rope_head_dim dims. The one KV head of head_dim serves as both key and value (shared-KV MQA).
- A learned per-head sink logit joins every softmax and takes weight without contributing a value (attention may
  rest on nothing).
- Values carry their keys' RoPE; the output's RoPE dims are rotated back by the query's position, so what a key
  contributes depends on relative position only.
- The H x head_dim outputs are projected in o_groups groups to o_lora_rank each, then mixed to the hidden size
  (the grouped low-rank output projection), far cheaper than one H x head_dim -> hidden matrix.
Sliding-window layers rotate with rope_theta; layers with a compressor with compress_rope_theta and YaRN (rope.py).
"""

import torch
from torch import nn

from .compressor import Compressor
from .config import ModelConfig
from .linear import Linear, matmul
from .norm import RMSNorm
from .rope import inverse, rope_tail, softmax_scale


class HybridAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        d, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.window, self.eps = H, D, cfg.sliding_window, cfg.rms_norm_eps
        self.groups = cfg.o_groups
        self.q_a_proj = Linear(d, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, H * D, bias=False)
        self.kv_proj = Linear(d, D, bias=False)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        # o_a_proj: per group g, rows [g r, (g+1) r) map that group's H D / G outputs to r = o_lora_rank
        self.o_a_proj = Linear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.o_b_proj = Linear(cfg.o_groups * cfg.o_lora_rank, d, bias=False)
        self.sinks = nn.Parameter(torch.empty(H))
        self.scale = softmax_scale(cfg)
        self.compressor = None
        if layer_type != "sliding_attention":
            rate = cfg.compress_rates[layer_type]
            sparse = layer_type == "compressed_sparse_attention"
            self.compressor = Compressor(cfg, rate, D, overlap=sparse, indexed=sparse)
        self.rope_kind = "main" if self.compressor is None else "compress"

    def queries(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> queries [B, T, H, D] (RMS-normalised per head, RoPE on the last dims) and the query
        latent [B, T, q_lora_rank] (CSA's indexer builds its queries from it)."""
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).unflatten(-1, (self.n_heads, self.head_dim))
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)
        return rope_tail(q, rope.unsqueeze(-2)), q_latent

    def keys(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> the shared key-value head [B, T, D], RoPE on its last dims."""
        return rope_tail(self.kv_norm(self.kv_proj(x)), rope)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, index_losses: list | None = None) -> torch.Tensor:
        """Causal attention over x [B, T, d] (positions 0 .. T-1) -> [B, T, d]. rope: this layer's rotations of
        those positions (rope_kind). index_losses, when given, gets a CSA layer's indexer loss (index_kl)."""
        B, T, _ = x.shape
        q, q_latent = self.queries(x, rope)
        kv = self.keys(x, rope)
        t = torch.arange(T, device=x.device)
        near = (t[:, None] >= t) & (t[:, None] - t < self.window)  # [T, T]: the sliding window
        allowed = near.expand(B, T, T)
        if self.compressor is not None:
            entries = self.compressor(x, rope)  # [B, W, D]
            allowed_c = self.compressor.visible(T, entries.shape[1], x.device).expand(B, T, -1)
            indexer = self.compressor.indexer
            if indexer is not None and entries.shape[1]:
                with torch.no_grad():  # a selection: no gradient reaches the indexer through it
                    allowed_c = indexer.select(indexer.scores(x, q_latent, rope, indexer(x, rope)), allowed_c)
                if index_losses is not None:
                    index_losses.append(self.index_kl(x, q_latent, rope, q, entries, allowed_c))
            kv = torch.cat([kv, entries], dim=1)
            allowed = torch.cat([allowed, allowed_c], dim=-1)
        return self.output(self.attend(q, kv, allowed), rope)

    def index_kl(self, x: torch.Tensor, q_latent: torch.Tensor, rope: torch.Tensor, q: torch.Tensor,
                 entries: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """CSA's indexer loss, as DeepSeek-V3.2's (its report, section 2.2) over compressed entries: per query,
        KL(p || softmax(I)) over the entries it attends (`chosen` [B, T, W]), p being this attention's
        probabilities among those entries summed over heads and L1-normalised. The indexer's inputs are detached:
        the loss trains the indexer only, which the language-model loss cannot reach (its choice is a top-k).
        Returns the mean over the queries that attend any entry."""
        B, T, H, D = q.shape
        reads = chosen.any(-1)  # [B, T]: queries before the first complete window attend no entry
        with torch.no_grad():
            logits = matmul(q.reshape(B, T * H, D), entries.transpose(1, 2)).view(B, T, H, -1).float() * self.scale
            p = logits.masked_fill(~chosen.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num_(0.0).sum(2)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        indexer, x = self.compressor.indexer, x.detach()
        scores = indexer.scores(x, q_latent.detach(), rope, indexer(x, rope))
        log_q = scores.masked_fill(~chosen, float("-inf")).log_softmax(-1)
        kl = torch.where(chosen & (p > 0), p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
        return (kl * reads).sum() / reads.sum().clamp_min(1)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """softmax over [sink; allowed keys] of q . k: queries q [B, T, H, D] against the shared head kv [B, S, D],
        allowed [B, T, S] bool. Returns [B, T, H, D] (still rotated)."""
        B, T, H, D = q.shape
        scores = matmul(q.reshape(B, T * H, D), kv.transpose(1, 2)).view(B, T, H, -1).float() * self.scale
        scores = scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        sink = self.sinks.float().view(1, 1, H, 1).expand(B, T, H, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1].to(kv.dtype)  # the sink takes no value
        return matmul(probs.reshape(B, T * H, -1), kv).view(B, T, H, D)

    def output(self, o: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, D] -> [B, T, d]: RoPE undone at the query's position, then the grouped projection."""
        B, T = o.shape[:2]
        o = rope_tail(o, inverse(rope).unsqueeze(-2)).reshape(B, T, self.groups, -1)
        w = self.o_a_proj.weight.view(self.groups, -1, o.shape[-1])  # [G, r, H D / G]
        o = matmul(o.transpose(1, 2), w.transpose(1, 2).unsqueeze(0))  # [B, G, T, r]
        return self.o_b_proj(o.transpose(1, 2).flatten(2))
