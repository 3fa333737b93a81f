"""Decoding speed of leanseek's Engine against transformers' `generate` (with its KV cache) on the same weights,
side by side in one run: tokens/s at batch 1, and aggregate tokens/s at 1, 4, 16 and 64 concurrent sequences.

    .venv/bin/python benchmarks/decode.py [--model RUN_DIR/latest | --preset tiny] [--new-tokens 64] [--threads 2]
                                          [--device auto|cpu|cuda[:N]] [--no-compile]

Greedy decoding of prompts of 32 tokens, a fixed number of new tokens (no early stop), float32 (TF32 matmuls on a
GPU). leanseek runs compiled (Engine(compile=True); compilation happens in an untimed warm-up; --no-compile skips
it, as it takes minutes on a GPU) and eagerly. Also prints the KV-cache bytes per token of both: MLA's latent cache
against the full keys and values transformers keeps.
"""

import argparse
import tempfile
import time

import torch
from harness import cpu_model

from leanseek.device import add_device_argument, pick_device


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model folder (default: a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="time the eager engine only")
    add_device_argument(ap)
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    from transformers import AutoModelForCausalLM

    import leanseek

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            leanseek.save_hf(leanseek.Transformer(leanseek.ModelConfig.preset(args.preset)), tmp)
            path = tmp
        ours = leanseek.load_hf(path, device=device)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    cfg = ours.cfg
    batches = [int(b) for b in args.batches.split(",")]
    engines = {"eager": leanseek.Engine(ours, max_batch=max(batches), max_len=args.prompt_len + args.new_tokens)}
    if not args.no_compile:
        engines["compiled"] = leanseek.Engine(ours, max_batch=max(batches),
                                              max_len=args.prompt_len + args.new_tokens, compile=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {args.threads} threads"
    print(f"# greedy decode, {cfg.param_counts()}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"float32, {where}, torch {torch.__version__}, transformers {transformers.__version__}")
    report = engines["eager"].memory_report()
    print(f"# KV cache per token: leanseek {report['mla_bytes_per_token']:,} bytes (latent), standard attention "
          f"with the same heads {report['mha_bytes_per_token']:,} bytes (transformers caches that): "
          f"{report['reduction']:.1%} smaller")
    print(f"{'sequences':>9} {'leanseek tok/s':>15} {'(eager)':>8} {'transformers tok/s':>19} {'speedup':>8}")
    for batch in batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len)).to(device)
        new = batch * args.new_tokens

        def run(engine):
            outs = engine.generate(prompts.tolist(), max_new_tokens=args.new_tokens)
            assert all(len(o) == args.new_tokens for o in outs)
            return outs

        def run_theirs():
            with torch.no_grad():
                return theirs.generate(prompts, attention_mask=torch.ones_like(prompts),
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       do_sample=False, pad_token_id=0)[:, args.prompt_len:]

        # warm-up (and compilation), and a check that all of them decode the same tokens
        outs = [run(engine) for engine in engines.values()]
        same = all(o == outs[0] for o in outs) and outs[0] == run_theirs().tolist()
        t_eager = min(timed(lambda: run(engines["eager"])) for _ in range(2))
        t_ours = min(timed(lambda: run(engines["compiled"])) for _ in range(2)) if "compiled" in engines else t_eager
        t_theirs = min(timed(lambda: run_theirs().tolist()) for _ in range(2))  # tolist: waits for the GPU
        compiled = f"{new / t_ours:>15,.0f}" if "compiled" in engines else f"{'-':>15}"
        print(f"{batch:>9} {compiled} {new / t_eager:>8,.0f} {new / t_theirs:>19,.0f} "
              f"{t_theirs / t_ours:>7.2f}x{'' if same else '  (outputs differ)'}", flush=True)


if __name__ == "__main__":
    main()
