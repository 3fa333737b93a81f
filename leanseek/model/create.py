"""`leanseek init`: a randomly initialised model written as a Hugging Face folder (a starting point, or a model
to test loaders and servers with)."""

from __future__ import annotations

import argparse
import time

import torch

from .config import ModelConfig, human
from .hf import save_hf
from .transformer import Transformer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=["tiny", "tiny-dsa", "tiny-v4", "small"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def run(args) -> None:
    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset(args.preset)
    t0 = time.perf_counter()
    path = save_hf(Transformer(cfg), args.out, dtype=getattr(torch, args.dtype))
    print(f"wrote a randomly initialised {args.preset} model ({human(cfg.param_counts().total)} parameters) "
          f"to {path} in {time.perf_counter() - t0:.1f}s")
