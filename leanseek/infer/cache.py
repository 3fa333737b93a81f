"""The MLA latent KV cache: per layer, only [c^KV; k^R] of each position, the normalised latent and the rotated
shared key (kv_lora_rank + qk_rope_head_dim values), instead of every head's full key and value. One tensor holds
both, so a single matmul scores a query against them (see MLA.forward_absorbed); with DeepSeek-V3.2's sparse
attention, the lightning indexer's key too (index_head_dim values more).

Paged, as vLLM's PagedAttention (Kwon et al. 2023) and nano-vllm's block manager: the positions live in a pool of
fixed-size blocks shared by all sequences, and each sequence slot keeps a block table (its blocks in order), so
memory follows the tokens a sequence holds rather than the longest context it might reach. Full blocks are named by
a hash of every token up to their end, so a request whose prompt starts as an earlier one did (a system prompt, the
history of a chat) points its table at the blocks already computed and prefills only the rest (prefix reuse). A
block is shared by reference count; a named block nobody holds stays cached until a new block is needed, the least
recently used first."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..model.config import ModelConfig


BLOCK = 16  # positions per block: the unit of allocation and of prefix reuse
BUCKET = 64  # a compiled step attends over the positions filled, rounded up to a multiple of this (of BLOCK)
SCRATCH = 0  # the block padding rows and padding positions write to (never read unmasked)


def blocks_for(positions: int) -> int:
    return -(-positions // BLOCK)


class CacheFull(RuntimeError):
    """No free block is left (the engine admits requests only when their worst case fits, so this is a bug)."""


class LatentCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, layers: int | None = None, tokens: int | None = None):
        """slots sequences at once, each up to max_len positions, in a pool of `tokens` positions (default:
        enough blocks for every slot to fill its context). layers: how many attention layers to hold (default:
        the model's; the MTP modules get a cache of their own). One slot more than asked is kept as scratch
        space for the padding rows of fixed-shape steps."""
        L = cfg.num_hidden_layers if layers is None else layers
        pool = slots * blocks_for(max_len) if tokens is None else blocks_for(tokens)
        if pool < blocks_for(max_len):
            raise ValueError(f"a cache of {tokens} tokens cannot hold one sequence of {max_len} (the context); "
                             f"give it at least {blocks_for(max_len) * BLOCK}")
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.sparse_attention else 0)
        self.kv = torch.zeros(L, pool + 1, BLOCK, width, device=device, dtype=dtype)
        self.max_len = max_len
        self.scratch = slots
        self.lengths = [0] * slots  # positions filled in each slot
        self.tables: list[list[int]] = [[] for _ in range(slots)]  # each slot's blocks, in position order
        self.digests: list[list[bytes]] = [[] for _ in range(slots)]  # the names of each slot's first full blocks
        self.refs = [0] * (pool + 1)
        self.free = list(range(pool, 0, -1))  # blocks holding nothing worth keeping
        self.named: dict[bytes, int] = {}  # full blocks by the hash of every token up to their end
        self.name_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recently used first

    # ---------------------------------------------------------------------------------------------- accounting

    def values_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[-1]

    def bytes_per_token(self) -> int:
        return self.values_per_token() * self.kv.element_size()

    @property
    def capacity(self) -> int:
        """Positions the pool holds."""
        return (self.kv.shape[1] - 1) * BLOCK

    def available(self) -> int:
        """Blocks a new allocation can take: the free ones and the cached ones nobody holds."""
        return len(self.free) + len(self.idle)

    def held_tokens(self) -> int:
        """Positions in blocks that some sequence holds (shared blocks counted once)."""
        return sum(1 for r in self.refs[1:] if r) * BLOCK

    # ---------------------------------------------------------------------------------------------- blocks

    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.idle:  # evict the least recently used cached block
            b, _ = self.idle.popitem(last=False)
            del self.named[self.name_of.pop(b)]
        else:
            raise CacheFull(f"all {self.kv.shape[1] - 1} blocks of the latent cache are in use")
        self.refs[b] = 1
        return b

    def _hold(self, b: int) -> None:
        self.refs[b] += 1
        self.idle.pop(b, None)

    def _drop(self, b: int) -> None:
        self.refs[b] -= 1
        if not self.refs[b]:
            if b in self.name_of:
                self.idle[b] = None
            else:
                self.free.append(b)

    def reserve(self, slot: int, positions: int) -> None:
        """Give the slot blocks for its first `positions` positions."""
        table = self.tables[slot]
        while len(table) * BLOCK < positions:
            table.append(self._take())

    def release(self, slot: int) -> None:
        """Empty the slot: its blocks go back to the pool (named ones stay cached for a later prefix match)."""
        for b in self.tables[slot]:
            self._drop(b)
        self.tables[slot], self.digests[slot], self.lengths[slot] = [], [], 0

    # ---------------------------------------------------------------------------------------------- prefix reuse

    @staticmethod
    def _name(parent: bytes, tokens: list[int]) -> bytes:
        """A block's name: a hash of its parent's name and its own tokens, so of every token up to its end (SHA-256:
        a crafted prompt cannot make another's blocks its own)."""
        return hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in tokens)).digest()

    def match(self, slot: int, tokens: list[int]) -> int:
        """Point an empty slot at the cached blocks that hold a prefix of `tokens`, leaving at least the last
        token to compute (its output is the next token's distribution). Returns the positions reused."""
        assert not self.tables[slot], "match() is for an empty slot"
        parent = b""
        for i in range((len(tokens) - 1) // BLOCK):
            name = self._name(parent, tokens[i * BLOCK:(i + 1) * BLOCK])
            b = self.named.get(name)
            if b is None:
                break
            self._hold(b)
            self.tables[slot].append(b)
            self.digests[slot].append(name)
            parent = name
        self.lengths[slot] = len(self.tables[slot]) * BLOCK
        return self.lengths[slot]

    def publish(self, slot: int, tokens: list[int]) -> None:
        """Name the slot's full blocks that hold `tokens` (the tokens at its first len(tokens) positions, all
        computed), so later requests can reuse them. A block whose content is already cached elsewhere stays
        unnamed (it is freed with the slot)."""
        assert len(tokens) <= self.lengths[slot]
        names, table = self.digests[slot], self.tables[slot]
        while len(names) < len(tokens) // BLOCK:
            i = len(names)
            name = self._name(names[-1] if names else b"", tokens[i * BLOCK:(i + 1) * BLOCK])
            names.append(name)
            if name not in self.named and table[i] not in self.name_of:
                self.named[name], self.name_of[table[i]] = table[i], name

    # ---------------------------------------------------------------------------------------------- steps

    def step(self, slots: list[int], T: int, pad_to: int | None = None,
             counts: list[int] | None = None) -> CacheStep:
        """Place the next T tokens of the sequences in `slots`, each after its own filled positions (counts: how
        many of each row's T are real; the padding after them writes to scratch). pad_to: fixed shapes for a
        compiled forward, pad_to rows (the extra ones write to the scratch block) attending over the positions
        filled so far rounded up to a multiple of BUCKET, a dimension the compiled graph leaves dynamic (one graph
        for every length)."""
        return CacheStep(self, slots, T, pad_to, counts)


class CacheStep:
    """One forward pass over a LatentCache: the positions of B sequences' next T tokens, the attention mask over
    what each can see, and per layer a write of the new latents and a read of the visible ones (gathered through
    the block tables).

    Built outside the model's forward from the cache's Python bookkeeping; inside it, only tensors are used, so a
    compiled forward sees the same graph whatever the lengths (see Engine(compile=True))."""

    def __init__(self, cache: LatentCache, slots: list[int], T: int, pad_to: int | None = None,
                 counts: list[int] | None = None):
        self.cache, self.slots, self.T = cache, slots, T
        device = cache.kv.device
        self.counts = counts = [T] * len(slots) if counts is None else counts
        starts = [cache.lengths[s] for s in slots]
        S = max(start + n for start, n in zip(starts, counts))
        if S > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions per sequence; this step needs {S}")
        for s, start, n in zip(slots, starts, counts):
            cache.reserve(s, start + n)
        # fixed shapes (a compiled forward): the cache is only read inside the forward, each layer's new latents
        # are collected in `written` and stored afterwards (store()), since writing into a graph input would
        # copy the whole layer's cache every step
        self.fixed = pad_to is not None
        self.written: list[torch.Tensor] = []
        tables = [cache.tables[s] for s in slots]
        if self.fixed:
            extra = pad_to - len(slots)
            tables, starts, counts = tables + [[]] * extra, starts + [0] * extra, counts + [0] * extra
            S = -(-S // BUCKET) * BUCKET
        width = blocks_for(S)
        self.table = torch.tensor([t[:width] + [SCRATCH] * (width - len(t[:width])) for t in tables], device=device)
        # one sequence whose blocks lie in order in the pool (as a fresh cache hands them out): read() is a view
        first = tables[0][0] if len(tables) == 1 and tables[0] else None
        self.span = (first if not self.fixed and first is not None and tables[0][:width] == list(
            range(first, first + width)) else None)
        self.positions = torch.tensor([[p + k for k in range(T)] for p in starts], device=device)  # [B, T]
        self._bias: torch.Tensor | None = None
        self.carried: dict[int, torch.Tensor] = {}  # per layer, the read latents plus those written (SubStep)
        if self.fixed:
            torch._dynamo.maybe_mark_dynamic(self.table, 1)
        # where each new token's latent goes in a layer's pool viewed as [blocks x BLOCK, D]; padding to scratch
        self.index = torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK if k < n else SCRATCH * BLOCK + k % BLOCK
                                   for t, start, n in zip(tables, starts, counts)
                                   for k, p in enumerate(range(start, start + T))], device=device)

    @property
    def bias(self) -> torch.Tensor:
        """[B, 1, T, S] additive attention mask over the positions read: -inf where a position is not yet written
        for that query. Built inside the forward, so a compiled one computes it in its softmax instead of taking
        it as an input."""
        if self._bias is None or self.fixed:
            self._bias = _mask(self.positions, self.table.shape[1] * BLOCK)
        return self._bias

    def write(self, layer: int, latent: torch.Tensor) -> None:
        """latent [B, T, D] -> the cache at each sequence's new positions."""
        kv = self.cache.kv[layer]
        kv.view(-1, kv.shape[-1]).index_put_((self.index,), latent.reshape(-1, kv.shape[-1]).to(kv.dtype))

    def read(self, layer: int) -> torch.Tensor:
        """[B, S, D]: every position up to the furthest new one, in order (the mask hides what a row may not see)."""
        B, width = self.table.shape
        if self.span is not None:  # no copy: at long contexts the copy costs more than attention itself
            return self.cache.kv[layer, self.span:self.span + width].view(1, width * BLOCK, -1)
        return self.cache.kv[layer].index_select(0, self.table.flatten()).view(B, width * BLOCK, -1)

    def attend(self, layer: int, rope: torch.Tensor):
        """A Block `attend` callable: MLA in its absorbed form over this layer's cache."""
        def attend(attn, h: torch.Tensor) -> torch.Tensor:
            latent = attn.cache_entry(h, rope)
            if not self.fixed:
                self.write(layer, latent)
                return attn.forward_absorbed(h, rope, self.read(layer), self.bias)
            self.written.append(latent)
            rows = torch.arange(latent.shape[0], device=latent.device)[:, None]
            kv = self.read(layer).index_put((rows, self.positions), latent.to(self.cache.kv.dtype))
            return attn.forward_absorbed(h, rope, kv, self.bias)
        return attend

    def substep(self, k: int) -> SubStep:
        """Position k of the T, for a fixed-shape forward that computes the T tokens one after another (several
        greedy tokens in one compiled call, each the argmax after the one before)."""
        return SubStep(self, k)

    def store(self, written: list[torch.Tensor]) -> None:
        """Write the latents a fixed-shape forward collected (one [B, T, D] per layer) into the cache, all layers in
        one call."""
        if written:
            kv = self.cache.kv
            kv.view(kv.shape[0], -1, kv.shape[-1]).index_copy_(
                1, self.index, torch.stack(written).flatten(1, 2).to(kv.dtype))

    def advance(self) -> None:
        """Count the new positions as filled (after the forward pass that wrote them)."""
        for s, n in zip(self.slots, self.counts):
            self.cache.lengths[s] += n


class SubStep:
    """One position of a fixed-shape CacheStep, as model.step sees it: it attends over the cache and the latents
    the step's earlier positions wrote in the same forward (carried from one position to the next, per layer)."""

    def __init__(self, step: CacheStep, k: int):
        assert step.fixed, "sub-steps are for fixed-shape (compiled) forwards"
        self.step, self.k = step, k
        self.positions = step.positions[:, k:k + 1]

    def attend(self, layer: int, rope: torch.Tensor):
        step = self.step

        def attend(attn, h: torch.Tensor) -> torch.Tensor:
            latent = attn.cache_entry(h, rope)  # [B, 1, D]
            kv = step.carried[layer] if layer in step.carried else step.read(layer)
            rows = torch.arange(latent.shape[0], device=latent.device)[:, None]
            kv = step.carried[layer] = kv.index_put((rows, self.positions), latent.to(kv.dtype))
            if self.k == 0:
                step.written.append(latent)
            else:  # the layer's latents of positions 0..k, [B, k + 1, D], as store() takes them
                step.written[layer] = torch.cat([step.written[layer], latent], dim=1)
            return attn.forward_absorbed(h, rope, kv, _mask(self.positions, kv.shape[1]))
        return attend


def _mask(positions: torch.Tensor, S: int) -> torch.Tensor:
    """[B, 1, T, S] additive attention mask for queries at positions [B, T] over S cached positions: -inf where a
    position is after the query's own (not yet written for it)."""
    hidden = torch.arange(S, device=positions.device) > positions[..., None]
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))[:, None]
