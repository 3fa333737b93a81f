"""Quantised inference (`--quantize int8|int4`) against float32 on one run's model, side by side: weight memory,
validation bits per byte, greedy sums (pass@1 and replies identical to float32's), batch-1 decode speed; and the
kernel measurement that chose each mode (a matrix-vector product over 16 matrices of DeepSeek-V2-Lite's expert
gate/up shape, 2816 x 2048, too many to stay in cache).

    .venv/bin/python benchmarks/quantize.py RUN_DIR [--base pretrain] [--model rl] [--threads 2]

RUN_DIR is a speedrun folder: bits per byte are of its pretrained model (--base) on its validation split (what
pretraining reports), the sums and decode speed of its final model (--model).
"""

import argparse
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import best_of, cpu_model

import leanseek
from leanseek.data.shards import load_split
from leanseek.data.tokenizer import TextTokenizer
from leanseek.eval.tasks import complete, get_task
from leanseek.infer.quantize import GROUP, quantize_matrix, quantize_model, quantize_rows
from leanseek.train.checkpoint import checkpoint_of
from leanseek.train.loader import eval_windows
from leanseek.train.loop import token_bytes


def timed(fn, repeats: int = 5) -> float:
    """Best of `repeats` after one untimed call."""
    fn()
    return best_of(fn, repeats)


def kernels() -> None:
    N, K = 2816, 2048
    torch.manual_seed(0)
    weights = [torch.randn(N, K) for _ in range(16)]
    x = torch.randn(1, K)
    int8 = [quantize_matrix(w, "int8") for w in weights]
    int4 = [quantize_matrix(w, "int4") for w in weights]
    xq, xs = quantize_rows(x)
    rows = [("float32 (x @ w.T)", lambda: [x @ w.T for w in weights]),
            ("int8 weights + int8 activations (torch._int_mm), --quantize int8",
             lambda: [torch._int_mm(xq, q.t()) * xs * s for q, s in int8]),
            ("int8 weights only (torch._weight_int8pack_mm)",
             lambda: [torch._weight_int8pack_mm(x, q, s) for q, s in int8]),
            (f"int4 weights, groups of {GROUP} (torch._weight_int4pack_mm_for_cpu), --quantize int4",
             lambda: [torch._weight_int4pack_mm_for_cpu(x, q, GROUP, p) for q, p in int4])]
    base = None
    print(f"\nmatrix-vector products, 16 matrices of {N} x {K} (best of 5):\n")
    print("| kernel | ms | against float32 |\n|---|---|---|")
    for name, fn in rows:
        t = timed(fn)
        base = base or t
        print(f"| {name} | {t * 1e3:.1f} | {base / t:.2f}x |")


@torch.no_grad()
def bits_per_byte(model, x, y, nbytes) -> float:
    nats, total = 0.0, 0
    for start in range(0, len(x), 8):
        xb, yb = x[start:start + 8], y[start:start + 8]
        b = nbytes[yb.clamp(min=0)] * (yb >= 0)
        ce = F.cross_entropy(model(xb).float().flatten(0, 1), yb.flatten(), reduction="none").view_as(yb)
        nats += float((ce * (b > 0)).sum())
        total += int(b.sum())
    return nats / math.log(2) / total


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a speedrun folder (its data/ and a model folder)")
    ap.add_argument("--base", default="pretrain",
                    help="the model scored on the validation split (default: %(default)s)")
    ap.add_argument("--model", default="rl", help="the model that does sums (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=65536, help="validation targets scored")
    ap.add_argument("--problems", type=int, default=200, help="held-out sums, greedy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    path = checkpoint_of(run / args.model)
    tokenizer = TextTokenizer.load(path)
    val, _ = load_split(run / "data", "val")
    x, y = eval_windows(val, 256, args.tokens)
    nbytes = token_bytes(tokenizer)
    task = get_task("sums")
    problems = task.test_set(args.problems)
    print(f"models: {checkpoint_of(run / args.base)} (bpb), {path} (the rest); CPU: {cpu_model()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{x.numel()} validation tokens, {len(problems)} held-out sums")
    print("\n| weights | memory (MiB) | validation bpb | sums greedy pass@1 | replies equal to float32's | "
          "batch-1 decode tok/s (eager) |\n|---|---|---|---|---|---|")
    base, final = leanseek.load_hf(checkpoint_of(run / args.base)).eval(), leanseek.load_hf(path).eval()
    reference = None
    for mode in ("float32", "int8", "int4"):
        model = final if mode == "float32" else quantize_model(copy.deepcopy(final), mode)
        bpb = bits_per_byte(base if mode == "float32" else quantize_model(copy.deepcopy(base), mode), x, y, nbytes)
        engine = leanseek.Engine(model, tokenizer, max_batch=64, max_len=512)
        replies = complete(engine, tokenizer, task, problems, max_new_tokens=64)
        tokens = [s[0].tokens for s in replies]
        reference = reference or tokens
        passed = sum(s[0].verdict.correct for s in replies) / len(replies)
        same = sum(a == b for a, b in zip(tokens, reference)) / len(tokens)
        one = leanseek.Engine(model, tokenizer, max_batch=1, max_len=512)
        prompt = tokenizer.encode("The harbor was quiet that morning, and")
        speed = 128 / timed(lambda: one.generate([prompt], max_new_tokens=128), repeats=3)
        print(f"| {mode} | {weight_bytes(model) / 2**20:.1f} | {bpb:.4f} | "
              f"{passed:.1%} | {same:.1%} | {speed:.0f} |")
    kernels()


if __name__ == "__main__":
    main()
