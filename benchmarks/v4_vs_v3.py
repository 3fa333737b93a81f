"""DeepSeek-V4's architecture against V3's at CPU scale: the `tiny` (V3: MLA, dense first layer, sigmoid routing) and
`tiny-v4` (hybrid sliding-window / CSA / HCA attention, mHC, hash routing first) presets, each trained by `leanseek
pretrain` on the same data for the same wall-clock budget, side by side.

    .venv/bin/python benchmarks/v4_vs_v3.py --data runs/data-builtin [--minutes 5] [--seq-len 256] [--batch 16]

Each model's step time is measured first (a few steps after warm-up, in this process), and its run gets as many
steps as fit the budget, with its own full learning-rate schedule. Printed: steps, tokens trained, tokens/s and the
final validation bits per byte of each, and the ratios; then `tiny` once more for as many steps as `tiny-v4` took
(the same tokens and schedule length), which tells whether V4 learns less per token or only runs slower. At this
scale V4's savings (a KV cache that grows by a few values a token, attention over a window and compressed entries)
barely apply at a 256-token window while its mHC streams (hc_mult copies of the residual) cost memory traffic, so the
figure says what V4 costs and buys on a CPU at tiny scale, not what the V4 report measured at a trillion tokens.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import cpu_model

from leanseek.model.config import ModelConfig
from leanseek.model.transformer import Transformer
from leanseek.train.losses import training_loss


def step_seconds(preset: str, batch: int, seq_len: int) -> float:
    """One training step's forward and backward (the optimizer aside: a small share), best of 3 after warm-up."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        training_loss(model, x, x, 0.3, 1e-4, 1.0).loss.backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times)


def train(preset: str, steps: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "leanseek", "pretrain", "--data", args.data, "--out", str(out), "--preset", preset,
           "--steps", str(steps), "--batch-size", str(args.batch), "--seq-len", str(args.seq_len),
           "--save-every", str(10 ** 9), "--eval-every", str(10 ** 9), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [x for x in lines if x["step"] > 0]
    return {"steps": steps, "tokens": steps * args.batch * args.seq_len, "wall": wall,
            "tokens_per_s": sum(x["tokens_per_s"] for x in trained[2:]) / max(1, len(trained) - 2),
            "val_bpb": trained[-1]["val_bpb"], "train_s": sum(x["seconds"] for x in trained)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `leanseek data` folder (the built-in corpus: --source builtin)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each model")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = ("tiny", "tiny-v4")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            steps = max(10, int(args.minutes * 60 / (step_seconds(preset, args.batch, args.seq_len) * 1.1)))
            results[preset] = train(preset, steps, args, Path(tmp) / preset)
            print(f"{preset}: {results[preset]}", file=sys.stderr)
        same = train("tiny", results["tiny-v4"]["steps"], args, Path(tmp) / "tiny-same-tokens")
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; budget {args.minutes:g} min each, "
          f"batch {args.batch} x {args.seq_len}")
    print(f"{'preset':8} {'params':>8} {'steps':>6} {'tokens':>10} {'train s':>8} {'tokens/s':>9} {'val bpb':>8}")
    for preset, r in [*results.items(), ("tiny", same)]:
        pc = ModelConfig.preset(preset).param_counts()
        print(f"{preset:8} {pc.total / 1e6:7.2f}M {r['steps']:6d} {r['tokens']:10,d} {r['train_s']:8.0f} "
              f"{r['tokens_per_s']:9.0f} {r['val_bpb']:8.4f}")
    v3, v4 = results["tiny"], results["tiny-v4"]
    print(f"V4 / V3: tokens/s {v4['tokens_per_s'] / v3['tokens_per_s']:.2f}x, validation bpb "
          f"{v4['val_bpb'] - v3['val_bpb']:+.4f} ({v4['val_bpb'] / v3['val_bpb']:.3f}x); at the same tokens "
          f"(the last row): {v4['val_bpb'] - same['val_bpb']:+.4f}")


if __name__ == "__main__":
    main()
