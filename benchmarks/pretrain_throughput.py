"""Tokens per second of `leanseek pretrain` against the same model trained by a plain transformers loop, one run.

    .venv/bin/python benchmarks/pretrain_throughput.py --data runs/data-builtin [--preset tiny] [--steps 30]

Both train the same initial weights on the same batches (global batch 16 x 256 by default): leanseek through its
own command (V3 objective with MTP off, so both compute the same next-token loss; then with MTP on, as it trains
by default), transformers as DeepseekV3ForCausalLM + torch AdamW + gradient clipping, the loop its documentation
shows. Prints the median tokens/s of each after warm-up and the ratio.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import cpu_model


def leanseek_run(args, out: Path, mtp_weight: float) -> float:
    cmd = [sys.executable, "-m", "leanseek", "pretrain", "--data", args.data, "--out", str(out), "--preset",
           args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch), "--seq-len", str(args.seq),
           "--save-every", str(10 ** 9), "--eval-every", str(10 ** 9), "--eval-tokens", str(args.seq),
           "--mtp-weight", str(mtp_weight), "--threads", str(args.threads), "--peak-tflops", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(x["tokens_per_s"] for x in lines[args.warmup:])


def transformers_run(args, init: Path) -> float:
    import transformers
    from transformers import DeepseekV3ForCausalLM

    from leanseek.data import load_split
    from leanseek.train.loader import WindowSampler

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = DeepseekV3ForCausalLM.from_pretrained(init, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens, _ = load_split(args.data, "train")
    sampler = WindowSampler(tokens, args.seq, args.batch, seed=0)
    speeds = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, _ = sampler.read(sampler.global_batch(step))
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(args.batch * args.seq / (time.perf_counter() - t0))
    return statistics.median(speeds[args.warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `leanseek data` folder")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = leanseek_run(args, tmp / "no-mtp", 0.0)
        ours_mtp = leanseek_run(args, tmp / "mtp", 0.3)
        # transformers starts from leanseek's step-0 weights (the same seed builds the same model)
        from leanseek import ModelConfig, Transformer, save_hf
        from leanseek.data import TextTokenizer

        tok = TextTokenizer.load(args.data)
        torch.manual_seed(0)
        save_hf(Transformer(ModelConfig.preset(args.preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                               eos_token_id=tok.eos_id)), tmp / "init")
        theirs = transformers_run(args, tmp / "init")
    print(f"# {args.preset}, global batch {args.batch} x {args.seq}, {cpu_model()}, {args.threads} threads, median of "
          f"{args.steps - args.warmup} steps after {args.warmup}, torch {torch.__version__}")
    print(f"leanseek pretrain (MTP off): {ours:8,.0f} tok/s  |  transformers loop: {theirs:8,.0f} tok/s  |  "
          f"{ours / theirs:.2f}x")
    print(f"leanseek pretrain (MTP on, lambda 0.3, as by default): {ours_mtp:8,.0f} tok/s ({ours_mtp / theirs:.2f}x)")


if __name__ == "__main__":
    main()
