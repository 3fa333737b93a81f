"""Decode time per token against context length, DeepSeek-V3.2's sparse attention (DSA) against dense MLA, on the
same model: the `small` preset (V3's attention head shapes: latent 512 + RoPE key 64, 8 heads) with a 4-head indexer
of V3.2's head size (128) choosing index_topk = 2,048 tokens per query (V3.2's number), so that the indexer costs a
key what V3.2's does against its MLA (about 6%); random weights, float32, batch 1, eager. Each context's cache is
filled with random latents (a decode step's time does not depend on their values), then one token is decoded at that
context over and over (the median step), the two models taking turns (the best of two rounds each).

    .venv/bin/python benchmarks/dsa_decode.py [--contexts 1024 4096 16384 65536] [--plot docs/dsa-decode.png]

Past index_topk, dense attention's work grows with the context and DSA's main attention does not (it reads 2,048
entries); what still grows for DSA is the indexer's scoring of every cached key (index_n_heads x index_head_dim
multiply-adds a key, against MLA's heads x (kv_lora_rank + qk_rope_head_dim) x 2) and reading the cache.
"""

import argparse
import statistics
import time

import torch
from harness import cpu_model

import leanseek
from leanseek.infer.cache import LatentCache
from leanseek.model.config import ModelConfig


def step_ms(model: leanseek.Transformer, context: int, steps: int) -> float:
    """Median milliseconds of one decode step at `context` cached positions (random latents)."""
    cache = LatentCache(model.cfg, slots=1, max_len=context + 1)
    cache.reserve(0, context)
    cache.kv.normal_()
    cache.lengths[0] = context
    token = torch.tensor([[7]])
    times = []
    with torch.no_grad():
        for i in range(steps + 3):
            t0 = time.perf_counter()
            model.lm_head(model.step(token, cache.step([0], 1)))  # writes position `context`, never advanced
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", help="write the curves to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, index_n_heads=4, index_head_dim=128, index_topk=args.topk,
                             max_position_embeddings=max(args.contexts) + 1)
    sparse = leanseek.Transformer(cfg).eval()
    dense = leanseek.Transformer(cfg.replace(index_n_heads=0)).eval()
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if ".indexer." not in k})
    kv = cfg.kv_cache_values_per_token()
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}; {args.preset} + DSA, index_topk "
          f"{args.topk}, {cfg.index_n_heads} indexer heads of {cfg.index_head_dim}; cache {kv['mla'] * 4} bytes a "
          f"token with DSA (the indexer's key {kv['indexer'] * 4}), {(kv['mla'] - kv['indexer']) * 4} without")
    rows = []
    print(f"{'context':>8}  {'dense ms/token':>14}  {'DSA ms/token':>12}  {'dense / DSA':>11}")
    for context in args.contexts:
        d, s = float("inf"), float("inf")
        for _ in range(args.rounds):  # the models take turns; the best round of each
            d, s = min(d, step_ms(dense, context, args.steps)), min(s, step_ms(sparse, context, args.steps))
        rows.append((context, d, s))
        print(f"{context:>8,}  {d:>14.2f}  {s:>12.2f}  {d / s:>10.2f}x", flush=True)
    print(f"at {rows[-1][0]:,} tokens DSA decodes {rows[-1][1] / rows[-1][2]:.2f}x as fast as dense MLA")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        contexts = [r[0] for r in rows]
        ax.plot(contexts, [r[1] for r in rows], "o-", label="dense MLA")
        ax.plot(contexts, [r[2] for r in rows], "o-", label=f"DSA (top {args.topk:,})")
        ax.axvline(args.topk, color="grey", linestyle=":", label="index_topk")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decoded token",
               title=f"batch-1 decode, {args.preset} + DSA, {cpu_model()}, {args.threads} threads")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
