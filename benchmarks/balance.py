"""Auxiliary-loss-free load balancing against a pure auxiliary-loss baseline (the V3 report's Table 5), at equal steps.

    .venv/bin/python benchmarks/balance.py --data runs/data-builtin [--steps 300] [--preset tiny]

Trains the same model twice on the built-in corpus with `leanseek pretrain`:
- aux-loss-free: the bias update (--gamma; V3 used 1e-3 over ~10^5 steps, a run of a few hundred steps needs a
  faster one) plus V3's tiny sequence-wise loss (alpha 1e-4);
- aux-loss: no bias update and a sequence-wise balance loss that does the balancing alone (--aux-alpha, default
  3e-3, DeepSeek-V2's expert-level weight, as the report's baselines used V2-style strengths).
Prints, side by side, the validation bits per byte at the end and the MaxVio (V3 report: how far the busiest
expert is above the mean load) averaged over the last quarter of training. The report found aux-loss-free
better on validation loss with comparable or better balance.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def train(args, out: Path, gamma: float, alpha: float) -> dict:
    cmd = [sys.executable, "-m", "leanseek", "pretrain", "--data", args.data, "--out", str(out), "--preset",
           args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch), "--seq-len", str(args.seq),
           "--bias-update-speed", str(gamma), "--balance-weight", str(alpha), "--save-every", str(10 ** 9),
           "--eval-every", str(10 ** 9), "--seed", str(args.seed)]
    subprocess.run(cmd, check=True, capture_output=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = [x for x in lines if x["step"] > args.steps * 3 // 4]
    return {"val_bpb": lines[-1]["val_bpb"], "ce": lines[-1]["ce"],
            "maxvio": sum(x["maxvio"] for x in tail) / len(tail),
            "maxvio_max": sum(x["maxvio_max"] for x in tail) / len(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-alpha", type=float, default=3e-3, help="DeepSeek-V2's expert-level balance weight")
    ap.add_argument("--gamma", type=float, default=1e-2,
                    help="bias update speed; V3's 1e-3 is for runs of many thousand steps")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        free = train(args, Path(tmp) / "free", gamma=args.gamma, alpha=1e-4)
        aux = train(args, Path(tmp) / "aux", gamma=0.0, alpha=args.aux_alpha)
    print(f"# {args.preset}, {args.steps} steps of {args.batch} x {args.seq}, seed {args.seed}, gamma {args.gamma:g}; "
          f"MaxVio averaged over the last quarter (mean over layers / worst layer)")
    print(f"{'':16}{'val bpb':>9}{'MaxVio':>9}{'worst':>9}")
    for name, r in (("aux-loss-free", free), (f"aux-loss {args.aux_alpha:g}", aux)):
        print(f"{name:16}{r['val_bpb']:9.4f}{r['maxvio']:9.3f}{r['maxvio_max']:9.3f}")


if __name__ == "__main__":
    main()
