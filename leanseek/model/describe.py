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
    from .catalog import CONTEXTS, kv_kib_per_token

    cfg = resolve_config(args.model)
    pc = cfg.param_counts()
    rows = [["model type", cfg.model_type], *(_v4_rows(cfg) if cfg.v4 else _mla_rows(cfg)),
            ["experts (routed, shared, active)",
             f"{cfg.n_routed_experts}, {cfg.n_shared_experts}, {cfg.num_experts_per_tok}"],
            ["parameters: total", f"{pc.total:,} ({human(pc.total)})"],
            ["parameters: active per token", f"{pc.active:,} ({human(pc.active)}; the input embedding, a lookup, "
                                             "not counted)"],
            ["parameters: MTP modules", f"{pc.mtp:,} ({human(pc.mtp)})"],
            [f"training FLOPs per token at {args.seq_len}", f"{cfg.flops_per_token(args.seq_len):.4g}"],
            *([f"KV cache per token at {name} (bf16)", f"{kv_kib_per_token(cfg, n):.2f} KiB"]
              for name, n in CONTEXTS.items())]
    if not cfg.v4:
        kv = cfg.kv_cache_values_per_token()
        rows.append(["KV cache values per token: MLA / MHA", f"{kv['mla']:,} / {kv['mha']:,} "
                                                             f"({kv['mla'] / kv['mha']:.1%})"])
    print(table(rows, [args.model, ""]))


def _mla_rows(cfg: ModelConfig) -> list[list[str]]:
    return [["layers (dense + MoE)", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} + "
                                     f"{cfg.num_hidden_layers - cfg.first_k_dense_replace})"],
            ["hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads}"],
            ["MLA ranks (q, kv) / head dims (nope, rope, v)",
             f"{cfg.q_lora_rank}, {cfg.kv_lora_rank} / {cfg.qk_nope_head_dim}, {cfg.qk_rope_head_dim}, "
             f"{cfg.v_head_dim}"],
            ["routing", f"{cfg.scoring_func} / {cfg.topk_method}, {cfg.topk_group} of {cfg.n_group} groups"],
            *([["sparse attention (DSA)", f"top {cfg.index_topk:,} tokens per query, indexer {cfg.index_n_heads} "
                                          f"heads of {cfg.index_head_dim}"]] if cfg.sparse_attention else [])]


def _v4_rows(cfg: ModelConfig) -> list[list[str]]:
    kinds = {kind: cfg.layer_types.count(kind) for kind in dict.fromkeys(cfg.layer_types)}
    rates = {"compressed_sparse_attention": "CSA", "heavily_compressed_attention": "HCA"}
    return [["layers", ", ".join(f"{n} {rates.get(k, 'sliding window only')}"
                                 + (f" (1 entry per {cfg.compress_rates[k]})" if k in rates else "")
                                 for k, n in kinds.items())],
            ["hidden / query heads / KV head", f"{cfg.hidden_size} / {cfg.num_attention_heads} / one of "
                                               f"{cfg.head_dim} (RoPE on {cfg.qk_rope_head_dim})"],
            ["sliding window / CSA top-k", f"{cfg.sliding_window} / {cfg.index_topk} entries (indexer "
                                           f"{cfg.index_n_heads} heads of {cfg.index_head_dim})"],
            ["output projection", f"{cfg.o_groups} groups of rank {cfg.o_lora_rank}"],
            ["residual streams (mHC)", f"{cfg.hc_mult}, Sinkhorn {cfg.hc_sinkhorn_iters} iterations"],
            ["routing", f"{cfg.scoring_func}; {cfg.mlp_layer_types.count('hash_moe')} hash-routed layers; SwiGLU "
                        f"clipped at {cfg.swiglu_limit:g}"]]
