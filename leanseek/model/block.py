"""One decoder layer: pre-norm MLA, then pre-norm dense SwiGLU or DeepSeekMoE, each with a residual; and
DeepSeek-V4's: pre-norm hybrid attention, then pre-norm MoE, each around manifold-constrained hyper-connections."""

from collections.abc import Callable

import torch
from torch import nn

from .attention import MLA
from .config import ModelConfig
from .hybrid_attention import HybridAttention
from .hyper import HyperConnection
from .mlp import SwiGLU
from .moe import MoE, Routing
from .norm import RMSNorm


Attend = Callable[[MLA, torch.Tensor], torch.Tensor]  # (attention module, normed input) -> attention output


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: torch.Tensor,
                attend: Attend | None = None) -> tuple[torch.Tensor, Routing | None]:
        """attend(self_attn, normed x): attention computed another way (over a latent cache, see Transformer.step)."""
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, rope) if attend is None else attend(self.self_attn, h))
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(self.post_attention_layernorm(x))
            return x + y, routing
        return x + self.mlp(self.post_attention_layernorm(x)), None


class HyperBlock(nn.Module):
    """A DeepSeek-V4 layer over hc_mult residual streams [B, T, n, d] (hyper.py): each sub-layer reads the streams
    collapsed, and its output is spread back over them as they are mixed."""

    def __init__(self, cfg: ModelConfig, layer_type: str, hashed: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = HybridAttention(cfg, layer_type)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, hashed)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, streams: torch.Tensor, rope: dict[str, torch.Tensor], input_ids: torch.Tensor,
                attend=None) -> tuple[torch.Tensor, Routing]:
        """rope: the rotations of the positions by kind ("main", "compress"); input_ids [B, T] for hash routing;
        attend(self_attn, normed input, rope): attention computed another way (over a decode state, see
        Transformer.step)."""
        h, post, comb = self.attn_hc(streams)
        h, rope = self.input_layernorm(h), rope[self.self_attn.rope_kind]
        out = self.self_attn(h, rope) if attend is None else attend(self.self_attn, h, rope)
        streams = HyperConnection.merge(streams, out, post, comb)
        h, post, comb = self.ffn_hc(streams)
        out, routing = self.mlp(self.post_attention_layernorm(h), input_ids)
        return HyperConnection.merge(streams, out, post, comb), routing
