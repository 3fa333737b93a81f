"""The DeepSeek-V3 language model: embedding, decoder blocks, final norm, output head, and the MTP modules; and
DeepSeek-V4's, whose blocks carry hc_mult residual streams that a hyper head collapses before the final norm."""

from dataclasses import dataclass, field

import torch
from torch import nn

from .block import Block, HyperBlock
from .config import ModelConfig
from .hyper import HyperHead
from .linear import Linear
from .moe import MoE, Router, Routing
from .mtp import HyperMTPModule, MTPModule
from .norm import RMSNorm
from .rope import Rotary


@dataclass
class TrainOutput:
    """Hidden states ready for the shared output head (logits = lm_head(hidden)); the loss computes the logits in
    chunks, so they are never held whole."""

    hidden: torch.Tensor  # [B, T, d] final-normed: position i predicts token i+1
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, d], position i predicts i+k+1
    routing: list[Routing] = field(default_factory=list)  # per router, in Transformer.routers() order


class Transformer(nn.Module):
    """A DeepSeek-V3 (or V2, V3.2, V4) causal language model.

    Module names follow transformers' DeepseekV3ForCausalLM (DeepseekV4ForCausalLM), less its `model.` prefix, so
    state-dict keys map to checkpoint names directly (routed experts are stacked here and split per expert on
    disk; V4 checkpoints use DeepSeek's own names, see hf.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # _weight skips nn.Embedding's own init (reset_parameters below does it), which on the meta device
        # would import the compiler stack and cost a second on every load_hf
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if cfg.v4:
            self.layers = nn.ModuleList(HyperBlock(cfg, kind, mlp == "hash_moe")
                                        for kind, mlp in zip(cfg.layer_types, cfg.mlp_layer_types))
            self.hc_head = HyperHead(cfg)
            self.compress_rotary = Rotary(cfg, "compress")
        else:
            self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList((HyperMTPModule if cfg.v4 else MTPModule)(cfg)
                                 for _ in range(cfg.num_nextn_predict_layers))
        self.rotary = Rotary(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for the routing bias. V4: zeros for
        the sinks, the compressors' position biases and the mHC biases, ones for the mHC scales, and a random hash
        table (K distinct experts per token id)."""
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or leaf in ("scale", "hc_scale"):
                p.fill_(1.0)
            elif name.endswith("norm.bias") or leaf in ("sinks", "position_bias", "base", "hc_base"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for r in self.routers():
            if r.e_score_correction_bias is not None and r.e_score_correction_bias.device.type != "meta":
                r.e_score_correction_bias.zero_()
            if r.tid2eid is not None and r.tid2eid.device.type != "meta":
                E, K = r.weight.shape[0], r.tid2eid.shape[1]
                r.tid2eid.copy_(torch.rand(r.tid2eid.shape[0], E).argsort(-1)[:, :K])

    def reset_rotary(self, device: torch.device | str) -> None:
        """Recompute the RoPE frequencies on `device` (after building on the meta device)."""
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset(device)

    def routers(self, mtp: bool = True) -> list[Router]:
        """Every MoE router: main layers first, then (when mtp) the MTP modules'."""
        blocks = list(self.layers) + ([m.block for m in self.mtp] if mtp else [])
        return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]

    def hidden(self, input_ids: torch.Tensor, attend=None) -> tuple[torch.Tensor, list[Routing], torch.Tensor]:
        """input_ids [B, T] -> final-normed hidden states [B, T, d], the routing of each MoE layer, and the RoPE
        rotations [T, dr/2] of positions 0..T-1. attend(rope): a Block `attend` for every layer (see
        forward_train)."""
        if self.cfg.v4:
            streams, routing, rope = self._streams(input_ids)
            return self.norm(self.hc_head(streams)), routing, rope
        x = self.embed_tokens(input_ids)
        rope = self.rotary(torch.arange(input_ids.shape[1], device=input_ids.device))
        routing = []
        for layer in self.layers:
            x, r = layer(x, rope, None if attend is None else attend(rope))
            if r is not None:
                routing.append(r)
        return self.norm(x), routing, rope

    def _streams(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                 attend=None) -> tuple[torch.Tensor, list[Routing], dict[str, torch.Tensor]]:
        """V4: the last layer's residual streams [B, T, n, d] (the embedding copied into each at the start), every
        layer's routing, and the rotations of the positions (default 0..T-1) by kind. attend(i): layer i's
        HyperBlock `attend` (None: the full forward's attention)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = {"main": self.rotary(positions), "compress": self.compress_rotary(positions)}
        x = self.embed_tokens(input_ids)
        streams = x.unsqueeze(-2).expand(*x.shape[:-1], self.cfg.hc_mult, x.shape[-1])
        routing = []
        for i, layer in enumerate(self.layers):
            streams, r = layer(streams, rope, input_ids, None if attend is None else attend(i))
            routing.append(r)
        return streams, routing, rope

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size] (the main head only)."""
        h, _, _ = self.hidden(input_ids)
        return self.lm_head(h)

    def step(self, input_ids: torch.Tensor, at) -> torch.Tensor:
        """Decode with a latent cache: input_ids [B, T] continue sequences held in a cache, at the positions `at`
        gives (a leanseek.infer.cache.CacheStep); their latents are written to the cache and attention runs in
        the absorbed form over it. Returns the final-normed hidden states [B, T, d]: lm_head gives the logits, and
        MTP drafts from them."""
        if self.cfg.v4:  # at: a leanseek.infer.compressed_cache.CompressedStep
            streams, _, _ = self._streams(input_ids, at.positions, at.attend)
            return self.norm(self.hc_head(streams))
        rope = self.rotary(at.positions)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, rope, at.attend(i, rope))
        return self.norm(x)

    def mtp_step(self, hidden: torch.Tensor, next_ids: torch.Tensor, at,
                 depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` over a latent cache of its own (its layer depth-1), at the positions `at` gives:
        the depth-(k-1) states `hidden` [B, T, d] of positions i paired with tokens i+k `next_ids` [B, T]
        (Eq. 21). Returns h^k for the next depth and h^k normalised for the shared head."""
        rope = self.rotary(at.positions)
        h, normed, _ = self.mtp[depth - 1](hidden, self.embed_tokens(next_ids), rope, at.attend(depth - 1, rope))
        return h, normed

    def forward_train(self, input_ids: torch.Tensor, mtp: bool = True, index_losses: list | None = None,
                      dense: bool = False) -> TrainOutput:
        """Main hidden states plus, when mtp, each MTP depth's (Eqs. 21-23), and every router's decision. With
        sparse attention, index_losses (a list) collects every layer's indexer loss (MLA.index_kl), and dense
        attends densely (the indexer's warm-up)."""
        if self.cfg.v4:
            return self._forward_train_v4(input_ids, mtp, index_losses)
        attend = ((lambda rope: lambda attn, h: attn(h, rope, index_losses, dense))
                  if self.cfg.sparse_attention and (index_losses is not None or dense) else None)
        h, routing, rope = self.hidden(input_ids, attend)
        out = TrainOutput(h, routing=routing)
        if not mtp:
            return out
        T = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            # depth k pairs the depth-(k-1) state at position i with the embedding of token i+k
            h, normed, r = module(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), rope[: T - k],
                                  None if attend is None else attend(rope[: T - k]))
            out.mtp_hidden.append(normed)
            out.routing.append(r)
        return out

    def _forward_train_v4(self, input_ids: torch.Tensor, mtp: bool, index_losses: list | None) -> TrainOutput:
        """forward_train for V4: each MTP depth continues the previous depth's residual streams (the main model's
        before its hyper head); index_losses collects the CSA layers' indexer losses (HybridAttention.index_kl)."""
        attend = None if index_losses is None else lambda i: lambda attn, h, rope: attn(h, rope, index_losses)
        streams, routing, rope = self._streams(input_ids, attend=attend)
        out = TrainOutput(self.norm(self.hc_head(streams)), routing=routing)
        T = input_ids.shape[1]
        for k, module in enumerate(self.mtp if mtp else [], start=1):
            if T - k <= 0:
                break
            rope_k = {kind: r[: T - k] for kind, r in rope.items()}
            streams, normed, r = module(streams[:, : T - k], self.embed_tokens(input_ids[:, k:]), rope_k,
                                        input_ids[:, k:])
            out.mtp_hidden.append(normed)
            out.routing.append(r)
        return out
