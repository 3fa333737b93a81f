"""DeepSeek-V4's decode state (V4 report section 2.3): what each layer must keep of the past to attend as a full
forward does, and no more.

Per sequence and layer:
- the sliding window: the last sliding_window keys (one head of head_dim each, RoPE applied), oldest first;
- in CSA and HCA layers, the compressed entries made so far (one per `rate` tokens), and for CSA the indexer's
  compressed keys too;
- each compressor's pending input: the values and gates of the last 2 x rate tokens, from which a window's entry is
  pooled once its last token arrives (CSA's windows reach back into the window before).
So memory grows by (head_dim [+ index_head_dim]) / rate values per token in a compressed layer, and is constant in a
sliding-window one, where MLA's cache grows by kv_lora_rank + qk_rope_head_dim in every layer.

The engine drives it as it drives the paged LatentCache (step, advance, release), one slot per running sequence,
each slot's state allocated up front for the engine's context. Sequences share nothing (no prefix reuse), and a step
cannot be undone (no speculative drafts): a compressor's state moves forward only.
"""

from __future__ import annotations

import torch

from ..model.compressor import Compressor
from ..model.config import ModelConfig
from ..model.rope import rope_tail
from .cache import blocks_for


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] at index [B, ...] (clamped into range) -> [B, ..., C]."""
    flat = index.clamp(0, x.shape[1] - 1).flatten(1)
    return x.gather(1, flat[..., None].expand(-1, -1, x.shape[-1])).view(*index.shape, x.shape[-1])


class _CompressorState:
    """One compressor's pending input and entries, for every slot (and one scratch row of entries each, where the
    windows a step computes but that are not complete are written)."""

    def __init__(self, comp: Compressor, slots: int, max_len: int, device, dtype):
        width = comp.kv_proj.weight.shape[0]
        self.comp = comp
        self.kv = torch.zeros(slots, 2 * comp.rate, width, device=device, dtype=dtype)
        self.gate = torch.zeros(slots, 2 * comp.rate, width, device=device, dtype=dtype)
        self.entries = torch.zeros(slots, max_len // comp.rate + 1, comp.head_dim, device=device, dtype=dtype)


class CompressedCache:
    def __init__(self, model, slots: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        cfg: ModelConfig = model.cfg
        self.cfg, self.rotary, self.max_len = cfg, model.compress_rotary, max_len
        self.lengths = [0] * slots
        self.tables: list[list[int]] = [[] for _ in range(slots)]  # no blocks: every slot holds its whole context
        self.windows = [torch.zeros(slots, cfg.sliding_window, cfg.head_dim, device=device, dtype=dtype)
                        for _ in model.layers]
        self.compressors: list[dict[str, _CompressorState]] = []
        for layer in model.layers:
            comp = layer.self_attn.compressor
            states = {}
            if comp is not None:
                states["main"] = _CompressorState(comp, slots, max_len, device, dtype)
                if comp.indexer is not None:
                    states["index"] = _CompressorState(comp.indexer, slots, max_len, device, dtype)
            self.compressors.append(states)

    # ---------------------------------------------------------------------------------------------- accounting

    def bytes_per_token(self) -> float:
        """What the state grows by per token: the compressed entries (the windows and pending inputs are fixed)."""
        return sum(s.entries[0, 0].numel() * s.entries.element_size() / s.comp.rate
                   for states in self.compressors for s in states.values())

    @property
    def capacity(self) -> int:
        return len(self.lengths) * self.max_len

    def available(self) -> int:
        """Every slot holds its whole context: a free slot always fits a request (in LatentCache's blocks)."""
        return len(self.lengths) * blocks_for(self.max_len)

    def held_tokens(self) -> int:
        return sum(self.lengths)

    # ---------------------------------------------------------------------------------------------- slots

    def match(self, slot: int, tokens: list[int]) -> int:
        """No prefix reuse: a compressor's state depends on every token before."""
        return 0

    def publish(self, slot: int, tokens: list[int]) -> None:
        pass

    def release(self, slot: int) -> None:
        """Empty the slot. Its tensors keep stale values, which a new sequence never sees: they sit at positions
        before 0 or past its own."""
        self.lengths[slot] = 0

    def step(self, slots: list[int], T: int, pad_to: int | None = None,
             counts: list[int] | None = None) -> CompressedStep:
        if pad_to is not None:
            raise ValueError("DeepSeek-V4 models decode eagerly: no fixed-shape (compiled) steps")
        return CompressedStep(self, slots, T, counts)


class CompressedStep:
    """One forward pass of B sequences' next T tokens (counts: how many of each row's T are real; the padding after
    them changes no state)."""

    fixed = False

    def __init__(self, cache: CompressedCache, slots: list[int], T: int, counts: list[int] | None = None):
        self.cache, self.slots, self.T = cache, slots, T
        self.counts = [T] * len(slots) if counts is None else counts
        starts = [cache.lengths[s] for s in slots]
        if max(s + n for s, n in zip(starts, self.counts)) > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions per sequence; this step needs more")
        device = cache.windows[0].device
        self.ends = [s + n for s, n in zip(starts, self.counts)]
        self.rows = torch.tensor(slots, device=device)
        self.starts = torch.tensor(starts, device=device)[:, None]  # [B, 1]
        self.n = torch.tensor(self.counts, device=device)[:, None]
        self.positions = self.starts + torch.arange(T, device=device)  # [B, T]
        self.written: list[torch.Tensor] = []

    def attend(self, layer: int):
        """A HyperBlock `attend` callable: the layer's attention over its state, which it then moves forward."""
        return lambda attn, h, rope: self._attend(layer, attn, h, rope)

    def store(self, written: list[torch.Tensor]) -> None:
        pass

    def advance(self) -> None:
        for s, n in zip(self.slots, self.counts):
            self.cache.lengths[s] += n

    def _attend(self, layer: int, attn, h: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        q, q_latent = attn.queries(h, rope)
        window = self.cache.windows[layer]
        W = window.shape[1]
        keys = torch.cat([window[self.rows], attn.keys(h, rope)], dim=1)  # positions start - W ...
        p = (self.starts - W + torch.arange(W + self.T, device=h.device))[:, None, :]  # [B, 1, W + T]
        t = self.positions[..., None]
        allowed = (p >= 0) & (p <= t) & (t - p < W)
        window[self.rows] = _take(keys, self.n + torch.arange(W, device=h.device))  # the last W real ones
        states = self.cache.compressors[layer]
        if states:
            entries, visible = self._compress(states["main"], h)
            if "index" in states:  # fed every step: its pending input must hold every token
                index_keys, _ = self._compress(states["index"], h)
                indexer = attn.compressor.indexer
                if entries.shape[1]:
                    visible = indexer.select(indexer.scores(h, q_latent, rope, index_keys), visible)
            keys, allowed = torch.cat([keys, entries], dim=1), torch.cat([allowed, visible], dim=-1)
        return attn.output(attn.attend(q, keys, allowed), rope)

    def _compress(self, state: _CompressorState, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed this step's tokens to a compressor: pool every window they complete into an entry, keep the last
        2 x rate tokens' values and gates. Returns the entries the rows may read [B, E, head_dim] and which each
        query sees [B, T, E]."""
        comp, m = state.comp, state.comp.rate
        kv, gate = comp.project(h, self.positions)
        recent_kv = torch.cat([state.kv[self.rows], kv], dim=1)  # index j: position start - 2m + j
        recent_gate = torch.cat([state.gate[self.rows], gate], dim=1)
        arange = torch.arange(max(1, -(-self.T // m)), device=h.device)
        w = self.starts // m + arange  # [B, K]: the windows this step may complete
        complete = w < (self.starts + self.n) // m
        index = (w * m - self.starts + 2 * m)[..., None] + torch.arange(m, device=h.device)  # [B, K, m]
        kv_w, gate_w = _take(recent_kv, index), _take(recent_gate, index)
        if comp.overlap:  # the previous window's Ca (there is none before window 0), then this one's Cb
            D = comp.head_dim
            first = (w == 0)[..., None, None]
            kv_w = torch.cat([_take(recent_kv, index - m)[..., :D], kv_w[..., D:]], dim=2)
            gate_w = torch.cat([_take(recent_gate, index - m)[..., :D].masked_fill(first, float("-inf")),
                                gate_w[..., D:]], dim=2)
        entries = rope_tail(comp.pool(kv_w, gate_w), self.cache.rotary(w * m))
        slot_entries = state.entries
        scratch = slot_entries.shape[1] - 1
        slot_entries[self.rows[:, None], torch.where(complete, w, scratch)] = entries.to(slot_entries.dtype)
        keep = self.n + torch.arange(2 * m, device=h.device)
        state.kv[self.rows], state.gate[self.rows] = _take(recent_kv, keep), _take(recent_gate, keep)
        E = max(end // m for end in self.ends)
        visible = torch.arange(E, device=h.device) < ((self.positions + 1) // m)[..., None]
        return slot_entries[self.rows, :E], visible
