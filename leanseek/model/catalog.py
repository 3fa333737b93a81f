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
        pc, kv = cfg.param_counts(), cfg.kv_cache_values_per_token()
        rows.append([name, human(pc.total), human(pc.active), human(pc.mtp),
                     f"{cfg.flops_per_token(args.seq_len) / 1e9:.3g}", f"{kv['mla'] * 2 / 1024:.1f}",
                     f"{kv['mha'] * 2 / 1024:.1f}"])
    print(table(rows, ["preset", "total", "active", "MTP", f"GFLOP/token@{args.seq_len}", "KV KiB/token (MLA)",
                       "(MHA)"]))
    print("\nGFLOP/token: training (forward + backward), MTP included. KV cache in bf16: MLA caches "
          "kv_lora_rank + qk_rope_head_dim per layer (and index_head_dim for a sparse-attention indexer's key); MHA "
          "would cache full keys and values for every head.")
