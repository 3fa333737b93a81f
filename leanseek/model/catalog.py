"""`leanseek presets`: every preset's parameters, training FLOPs and KV-cache size, side by side."""

from __future__ import annotations

import argparse

from ..console import table
from .config import ModelConfig, human
from .presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=4096)


def run(args) -> None:
    rows = []
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        pc = cfg.param_counts()
        rows.append([name, cfg.model_type, human(pc.total), human(pc.active), human(pc.mtp),
                     f"{cfg.flops_per_token(args.seq_len) / 1e9:.3g}",
                     *(f"{kv_kib_per_token(cfg, n):.2f}" for n in CONTEXTS.values())])
    print(table(rows, ["preset", "type", "total", "active", "MTP", f"GFLOP/token@{args.seq_len}",
                       *(f"KV KiB/token@{c}" for c in CONTEXTS)]))
    print("\nGFLOP/token: training (forward + backward), MTP included. KV: one sequence's decode cache at that "
          "context (bf16) per token; MLA (V3, V3.2) caches kv_lora_rank + qk_rope_head_dim values per layer per token "
          "(and index_head_dim for V3.2's indexer key); V4 caches a sliding window per layer plus one entry per "
          "`rate` tokens in its compressed layers.")


CONTEXTS = {"128K": 128 * 1024, "1M": 1024 * 1024}


def kv_kib_per_token(cfg: ModelConfig, context: int) -> float:
    """One sequence's decode cache at `context` tokens, in bf16, per token."""
    return cfg.kv_cache_values(context) * 2 / context / 1024
