"""DeepSeek-V4's KV compressors and the lightning indexer over compressed entries (V4 report section 2.3).

A compressor turns every `rate` consecutive tokens into one KV entry: each token projects a value C and a gate Z
(Eqs. 20-21), and the entry is sum_j softmax_j(Z_j + B_j) * C_j over the window, per channel, with a learned
bias B per position in the window; then an RMSNorm and RoPE at the window's first position (Eqs. 22-23).
- Heavily compressed attention (HCA, rate m' = 128) pools disjoint windows.
- Compressed sparse attention (CSA, rate m = 4) pools overlapping ones: each token projects two series, Ca for the
  next window and Cb for its own, so entry w pools window w-1's Ca with window w's Cb (2m tokens, stride m). A
  lightning indexer, with a compressor of its own at index_head_dim, then picks for each query the index_topk
  entries it scores best (Eqs. 13-17), as DeepSeek-V3.2's indexer picks tokens.
An entry covering tokens up to p may be attended by queries at p and after only: query t sees entries w with
(w + 1) * rate <= t + 1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear, matmul
from .norm import RMSNorm
from .rope import rope_tail


class Compressor(nn.Module):
    """overlap: CSA's overlapping windows (which come with an indexer, unless this is the indexer's own)."""

    def __init__(self, cfg: ModelConfig, rate: int, head_dim: int, overlap: bool, indexed: bool = False):
        super().__init__()
        self.rate, self.head_dim, self.overlap = rate, head_dim, overlap
        width = 2 * head_dim if overlap else head_dim  # overlapping windows: [Ca; Cb]
        self.kv_proj = Linear(cfg.hidden_size, width, bias=False)
        self.gate_proj = Linear(cfg.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg, rate) if indexed else None

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x [B, T, d] at positions [T] or [B, T] -> their values C and gates Z + B [B, T, width] (the
        bias of each token's place in its window)."""
        return self.kv_proj(x), self.gate_proj(x) + self.position_bias[positions % self.rate]

    def pool(self, kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Windows of values and gates [..., s, head_dim] -> their entries [..., head_dim], normalised (no RoPE)."""
        return self.kv_norm((kv * gate.softmax(dim=-2, dtype=torch.float32).to(kv.dtype)).sum(dim=-2))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] (tokens from position 0) -> the entries of its T // rate complete windows [B, W, head_dim].
        rope: the compressed branch's rotations of positions 0 .. T-1 (entry w takes position w * rate)."""
        B, T, _ = x.shape
        W, m, D = T // self.rate, self.rate, self.head_dim
        if W == 0:
            return x.new_zeros(B, 0, D)
        kv, gate = self.project(x[:, :W * m], torch.arange(W * m, device=x.device))
        kv, gate = kv.view(B, W, m, -1), gate.view(B, W, m, -1)
        if self.overlap:  # window w: the previous window's Ca (none for window 0: weight 0), then its own Cb
            kv = torch.cat([F.pad(kv[:, :-1, :, :D], (0, 0, 0, 0, 1, 0)), kv[..., D:]], dim=2)
            gate = torch.cat([F.pad(gate[:, :-1, :, :D], (0, 0, 0, 0, 1, 0), value=float("-inf")), gate[..., D:]],
                             dim=2)
        return rope_tail(self.pool(kv, gate), rope[: W * m: m])

    def visible(self, T: int, n_entries: int, device: torch.device) -> torch.Tensor:
        """[T, n_entries] bool: query t may attend entry w once the window's last token, (w + 1) * rate - 1, is
        at or before t."""
        t = torch.arange(T, device=device)
        return torch.arange(n_entries, device=device) < ((t + 1) // self.rate)[:, None]


class Indexer(Compressor):
    """CSA's lightning indexer: a compressor at index_head_dim for its keys, and per query index_n_heads heads
    from MLA-style compressed query latent; I_{t,s} = sum_h w_{t,h} ReLU(q_{t,h} . K_s) (Eq. 16)."""

    def __init__(self, cfg: ModelConfig, rate: int):
        super().__init__(cfg, rate, cfg.index_head_dim, overlap=True)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, bias=False)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, rope: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Index scores [B, T, W] in float32 of queries x [B, T, d] (their query latent, rope of their positions)
        against compressed keys [B, W, index_head_dim]. No causal mask: the caller's."""
        B, T, _ = x.shape
        q = rope_tail(self.q_b_proj(q_latent).unflatten(-1, (self.n_heads, self.head_dim)), rope.unsqueeze(-2))
        logits = matmul(q.reshape(B, T * self.n_heads, self.head_dim).float(), keys.transpose(1, 2).float())
        relu = F.relu(logits.view(B, T, self.n_heads, -1)) * self.head_dim ** -0.5
        weights = self.weights_proj(x).float() * self.n_heads ** -0.5
        return matmul(weights.unsqueeze(-2), relu).squeeze(-2)

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """[B, T, W] bool: the index_topk visible entries each query scores best (all visible ones if fewer).

        ReLU makes exact ties common (every head's product negative: a score of 0). Among tied entries the earlier
        ones win (a stable sort), so a query picks the same entries however many later ones exist: a decode step
        agrees with a full forward of any length (topk breaks ties by no fixed rule)."""
        if scores.shape[-1] <= self.topk:
            return visible.expand_as(scores)
        order = scores.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        best = order[..., : self.topk]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True) & visible
