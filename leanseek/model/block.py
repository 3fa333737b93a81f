"""One decoder layer: pre-norm MLA, then pre-norm dense SwiGLU or DeepSeekMoE, each with a residual."""

from collections.abc import Callable

import torch
from torch import nn

from .attention import MLA
from .config import ModelConfig
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
