"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2-Exp report, section 2.1, Eqs. 1-2).

For query token t and an earlier token s, I_{t,s} = sum_j w_{t,j} ReLU(q_{t,j} . k_s) (Eq. 1): a few heads j, each
query head and the per-head weight w_{t,j} derived from token t, one key k_s per token shared by the heads. Each
query then attends only to the index_topk tokens with the highest I_{t,s} (Eq. 2); with as many tokens or fewer, to
all of them, as dense attention does.

Weight layout and arithmetic follow the released checkpoints and transformers' DeepseekV32 model: the query comes
from MLA's compressed query latent (wq_b), the key from the layer's input (wk, then a LayerNorm), and RoPE rotates
the first qk_rope_head_dim dimensions of each as (x_i, x_i+d/2) pairs, not MLA's interleaved ones. DeepSeek's
kernels also rotate q and k by a Hadamard matrix and score in FP8; the rotation leaves the dot products unchanged,
and leanseek scores in the model's dtype.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear, matmul
from .rope import apply_rope_halves


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.n_heads, self.head_dim = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
        self.dr, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(d, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(d, self.n_heads, bias=False)

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return torch.cat([apply_rope_halves(x[..., :self.dr], rope), x[..., self.dr:]], dim=-1)

    def keys(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] (the layer's normed input) -> k_s [B, T, head_dim], what a cache holds beside MLA's latent."""
        return self._rotate(self.k_norm(self.wk(x)), rope)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, rope: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, T, S] of queries x [B, T, d] (q_latent [B, T, q_lora_rank], rope of their positions)
        against keys [B, S, head_dim], in float32. No causal mask: the caller's."""
        B, T, _ = x.shape
        q = self._rotate(self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim)), rope.unsqueeze(-2))
        logits = matmul(q.reshape(B, T * self.n_heads, self.head_dim), keys.transpose(1, 2))  # [B, T*H, S]
        relu = F.relu(logits.float().view(B, T, self.n_heads, -1) * self.head_dim ** -0.5)
        weights = self.weights_proj(x).float() * self.n_heads ** -0.5  # w_{t,j}
        return matmul(weights.unsqueeze(-2), relu).squeeze(-2)  # sum over heads: [B, T, S]

    def select(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Where each query may attend [B, T, S] (bool): the index_topk best-scoring keys among `allowed` (bool,
        broadcastable to scores: the causal and padding mask), all of them when there are no more than that."""
        if scores.shape[-1] <= self.topk:
            return allowed.expand_as(scores)
        best = scores.masked_fill(~allowed, float("-inf")).topk(self.topk, dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
        return chosen & allowed
