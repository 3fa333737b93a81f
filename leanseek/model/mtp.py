"""Multi-Token Prediction, V3 report section 2.2, Eqs. 21-25.

Module k predicts token i+k+1 from the depth-(k-1) representation of token i and the embedding of token i+k,
through its own decoder block. The embedding and output head are the main model's.

DeepSeek-V4's modules (HyperMTPModule) take the previous depth's residual streams [B, T, n, d], add the projected
embedding to each, run a sliding-window, score-routed V4 block, and collapse the streams with a hyper head of their
own before the final norm (DeepSeek's V4 reference code, MTPBlock).
"""

import torch
from torch import nn

from .block import Attend, Block, HyperBlock
from .config import ModelConfig
from .hyper import HyperHead
from .linear import Linear
from .moe import Routing
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)  # on the embedding of token i+k
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)  # on the previous depth's hidden state
        # M_k of Eq. 21. Checkpoints (vLLM, transformers' MtpLayer) concatenate [embedding; hidden], in that order.
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.block = Block(cfg, moe=True)  # TRM_k (Eq. 22); always MoE, as in DeepSeek-V3
        self.shared_head_norm = RMSNorm(d, cfg.rms_norm_eps)  # applied before the shared output head (Eq. 23)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope: torch.Tensor,
                attend: Attend | None = None) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """h [B, T', d] (depth k-1 at positions i), emb [B, T', d] (tokens i+k) -> h^k [B, T', d] for the next
        depth, h^k normalised for the shared output head, and the block's routing. attend: as in Block."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        h, routing = self.block(x, rope, attend)
        return h, self.shared_head_norm(h), routing


class HyperMTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)  # per stream
        self.e_proj = Linear(d, d, bias=False)
        self.h_proj = Linear(d, d, bias=False)
        self.block = HyperBlock(cfg, "sliding_attention", hashed=False)
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, streams: torch.Tensor, emb: torch.Tensor, rope: dict[str, torch.Tensor],
                input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """streams [B, T', n, d] (depth k-1 at positions i), emb [B, T', d] (tokens i+k) -> the streams for the
        next depth, their collapsed and normalised state for the shared output head, and the block's routing."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(-2) + self.h_proj(self.hnorm(streams))
        x, routing = self.block(x, rope, input_ids)
        return x, self.norm(self.hc_head(x)), routing
