"""The MLA latent KV cache: per layer and sequence slot, only the normalised latent c^KV and the rotated shared key
k^R of each position (kv_lora_rank + qk_rope_head_dim values), instead of every head's full key and value."""

from __future__ import annotations

import torch

from ..model.config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        L = cfg.num_hidden_layers
        self.c_kv = torch.zeros(L, slots, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(L, slots, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * slots  # positions filled in each slot
        self.max_len = max_len

    def values_per_token(self) -> int:
        return self.c_kv.shape[0] * (self.c_kv.shape[-1] + self.k_pe.shape[-1])

    def bytes_per_token(self) -> int:
        return self.values_per_token() * self.c_kv.element_size()
