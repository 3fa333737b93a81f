"""One training step (forward, cross-entropy, backward, AdamW) of leanseek against transformers'
DeepseekV3ForCausalLM on the same weights, measured side by side, alternating, in one run.

    .venv/bin/python benchmarks/train_step.py [--preset tiny] [--batch 8] [--seq 256] [--threads 2] [--repeats 9]

Prints the median step time of each and the ratio (transformers time / leanseek time; > 1 means leanseek is faster),
in float32 and under bf16 autocast.
"""

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings

import torch
from harness import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bf16-autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()  # its load report lists the MTP layer, which it does not use
    transformers.logging.disable_progress_bar()

    import leanseek
    from leanseek.train import training_loss

    cfg = leanseek.ModelConfig.preset(args.preset)
    ours = leanseek.Transformer(cfg)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leanseek.save_hf(ours, d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours.train()
    theirs.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def leanseek_loss():  # leanseek's training path, main next-token loss only (MTP and balance loss off)
        return training_loss(ours, x, y, mtp_weight=0.0, balance_weight=0.0).loss

    def hf_loss():  # transformers' training path: labels are shifted inside
        return theirs(input_ids=x, labels=x).loss

    runs = {"leanseek": (ours, leanseek_loss), f"transformers {transformers.__version__}": (theirs, hf_loss)}
    print(f"# one training step, preset {args.preset} ({cfg.param_counts()}), batch {args.batch} x {args.seq}, "
          f"{args.threads} threads, torch {torch.__version__}, {cpu_model()}")
    for mode in args.dtypes.split(","):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16-autocast" \
            else contextlib.nullcontext
        # each library's usual optimizer: leanseek's trainer uses the fused AdamW kernel; transformers' Trainer
        # default (adamw_torch) is the plain one on CPU
        optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                          fused=name == "leanseek")
                  for name, (m, _) in runs.items()}
        times = {name: [] for name in runs}
        for i in range(args.warmup + args.repeats):
            for name, (model, loss_fn) in runs.items():  # alternate, so drift in machine speed hits both
                t0 = time.perf_counter()
                with ctx():
                    loss = loss_fn()
                loss.backward()
                optims[name].step()
                optims[name].zero_grad(set_to_none=True)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        (a, ta), (b, tb) = med.items()
        tokens = args.batch * args.seq
        print(f"{mode:>14}: {a} {ta * 1e3:8.1f} ms ({tokens / ta:7.0f} tok/s)  |  {b} {tb * 1e3:8.1f} ms "
              f"({tokens / tb:7.0f} tok/s)  |  speedup {tb / ta:.2f}x")


if __name__ == "__main__":
    main()
