"""`leanseek info MODEL`: the shape and accounting (parameters, FLOPs, KV cache) of a preset or a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..console import table
from .config import ModelConfig, human
from .presets import PRESETS


def resolve_config(name: str) -> ModelConfig:
    """A preset name, or a folder / config.json path."""
    if name in PRESETS:
        return ModelConfig.preset(name)
    from .hf import read_config

    path = Path(name)
    return read_config(path.parent if path.name == "config.json" else path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name, model folder or config.json")
    p.add_argument("--seq-len", type=int, default=4096)


def run(args) -> None:
    cfg = resolve_config(args.model)
    pc, kv = cfg.param_counts(), cfg.kv_cache_values_per_token()
    rows = [["model type", cfg.model_type],
            ["layers (dense + MoE)", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} + "
                                     f"{cfg.num_hidden_layers - cfg.first_k_dense_replace})"],
            ["hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads}"],
            ["MLA ranks (q, kv) / head dims (nope, rope, v)",
             f"{cfg.q_lora_rank}, {cfg.kv_lora_rank} / {cfg.qk_nope_head_dim}, {cfg.qk_rope_head_dim}, "
             f"{cfg.v_head_dim}"],
            ["experts (routed, shared, active)",
             f"{cfg.n_routed_experts}, {cfg.n_shared_experts}, {cfg.num_experts_per_tok}"],
            ["routing", f"{cfg.scoring_func} / {cfg.topk_method}, {cfg.topk_group} of {cfg.n_group} groups"],
            ["parameters: total", f"{pc.total:,} ({human(pc.total)})"],
            ["parameters: active per token", f"{pc.active:,} ({human(pc.active)})"],
            ["parameters: MTP modules", f"{pc.mtp:,} ({human(pc.mtp)})"],
            *([["sparse attention (DSA)", f"top {cfg.index_topk:,} tokens per query, indexer {cfg.index_n_heads} "
                                          f"heads of {cfg.index_head_dim}"]] if cfg.sparse_attention else []),
            [f"training FLOPs per token at {args.seq_len}", f"{cfg.flops_per_token(args.seq_len):.4g}"],
            ["KV cache values per token: MLA / MHA", f"{kv['mla']:,} / {kv['mha']:,} "
                                                     f"({kv['mla'] / kv['mha']:.1%})"]]
    print(table(rows, [args.model, ""]))
