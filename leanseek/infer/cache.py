"""The MLA latent KV cache: per layer and sequence slot, only [c^KV; k^R] of each position, the normalised latent
and the rotated shared key (kv_lora_rank + qk_rope_head_dim values), instead of every head's full key and value.
One tensor holds both, so a single matmul scores a query against them (see MLA.forward_absorbed)."""

from __future__ import annotations

import torch

from ..model.config import ModelConfig


BUCKET = 64  # a compiled step attends over the positions filled, rounded up to a multiple of this


class LatentCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, layers: int | None = None):
        """layers: how many attention layers to hold (default: the model's; the MTP modules get a cache of their
        own). One slot more than asked is kept as scratch space for the padding rows of fixed-shape steps."""
        L = cfg.num_hidden_layers if layers is None else layers
        # BUCKET positions more than max_len: a compiled step's attention span never reaches the tensor's length,
        # where torch.compile would specialise (and compile again, mid-generation)
        self.kv = torch.zeros(L, slots + 1, max_len + BUCKET, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                              device=device, dtype=dtype)
        self.scratch = slots
        self.lengths = [0] * slots  # positions filled in each slot
        self.max_len = max_len

    def values_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[-1]

    def bytes_per_token(self) -> int:
        return self.values_per_token() * self.kv.element_size()

    def step(self, slots: list[int], T: int, pad_to: int | None = None) -> CacheStep:
        """Place the next T tokens of the sequences in `slots`, each after its own filled positions. pad_to: fixed
        shapes for a compiled forward, pad_to rows (the extra ones write to the scratch slot) attending over the
        positions filled so far rounded up to a multiple of BUCKET, a dimension the compiled graph leaves dynamic
        (one graph for every length)."""
        return CacheStep(self, slots, T, pad_to)


class CacheStep:
    """One forward pass over a LatentCache: the positions of B sequences' next T tokens, the attention mask over
    what each can see, and per layer a write of the new latents and a read of the visible ones.

    Built outside the model's forward from the cache's Python bookkeeping; inside it, only tensors are used, so a
    compiled forward sees the same graph whatever the lengths (see Engine(compile=True))."""

    def __init__(self, cache: LatentCache, slots: list[int], T: int, pad_to: int | None = None):
        self.cache, self.slots, self.T = cache, slots, T
        device = cache.kv.device
        starts = [cache.lengths[s] for s in slots]
        S = max(starts) + T
        if S > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions per sequence; this step needs {S}")
        # fixed shapes (a compiled forward): the cache is only read inside the forward, each layer's new latents
        # are collected in `written` and stored afterwards (store()), since writing into a graph input would
        # copy the whole layer's cache every step
        self.fixed = pad_to is not None
        self.written: list[torch.Tensor] = []
        if self.fixed:
            extra = pad_to - len(slots)
            slots, starts = slots + [cache.scratch] * extra, starts + [0] * extra
            S = -(-S // BUCKET) * BUCKET
        self.positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # [B, T]
        hidden = torch.arange(S, device=device) > self.positions[..., None]  # [B, T, S]: not yet written
        self.bias = torch.zeros(len(slots), 1, T, S, device=device).masked_fill_(hidden[:, None], float("-inf"))
        if self.fixed:
            torch._dynamo.maybe_mark_dynamic(self.bias, 3)
        self.rows = torch.tensor(slots, device=device)
        self.index = (self.rows[:, None] * cache.kv.shape[2] + self.positions).flatten()  # into [slots x length, D]
        lo = slots[0]
        self._view = slice(lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None

    def write(self, layer: int, latent: torch.Tensor) -> None:
        """latent [B, T, D] -> the cache at each sequence's new positions."""
        kv = self.cache.kv[layer]
        kv.view(-1, kv.shape[-1]).index_put_((self.index,), latent.reshape(-1, kv.shape[-1]).to(kv.dtype))

    def read(self, layer: int) -> torch.Tensor:
        """[B, S, D]: every position up to the furthest new one (the mask hides what a row may not see)."""
        kv = self.cache.kv[layer, :, : self.bias.shape[-1]]
        if not torch.compiler.is_compiling() and self._view is not None:  # eager: a view needs no gather
            return kv[self._view]
        return kv.index_select(0, self.rows)

    def attend(self, layer: int, rope: torch.Tensor):
        """A Block `attend` callable: MLA in its absorbed form over this layer's cache."""
        def attend(attn, h: torch.Tensor) -> torch.Tensor:
            latent = torch.cat(attn.latents(h, rope), dim=-1)
            if not self.fixed:
                self.write(layer, latent)
                return attn.forward_absorbed(h, rope, self.read(layer), self.bias)
            self.written.append(latent)
            rows = torch.arange(latent.shape[0], device=latent.device)[:, None]
            kv = self.read(layer).index_put((rows, self.positions), latent.to(self.cache.kv.dtype))
            return attn.forward_absorbed(h, rope, kv, self.bias)
        return attend

    def store(self, written: list[torch.Tensor]) -> None:
        """Write the latents a fixed-shape forward collected (one [B, T, D] per layer) into the cache."""
        for layer, latent in enumerate(written):
            self.write(layer, latent)

    def advance(self) -> None:
        """Count the T new positions as filled (after the forward pass that wrote them)."""
        for s in self.slots:
            self.cache.lengths[s] += self.T
