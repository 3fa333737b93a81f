"""MTP self-speculative decoding against plain decoding, on a model trained with MTP by `leanseek pretrain`:
tokens/s, the speedup, and how often the main model accepts the MTP module's draft.

    .venv/bin/python benchmarks/speculative.py [--model runs/pretrain-tiny/latest] [--new-tokens 128]

`./run.sh` makes runs/pretrain-tiny/latest. Prompts are the openings of texts like those in the built-in corpus;
each is decoded alone (batch 1) and all together (a batch), greedily (the outputs must be identical with and
without speculation) and by sampling (temperature 1, top-p 0.95, seeded). The engine runs compiled; compilation
happens in an untimed warm-up. Each step of speculative decoding runs the main model on two tokens and the MTP
module (one decoder block) once, so its cost relative to plain decoding is larger the fewer layers the model has:
one in five for tiny, one in 62 for DeepSeek-V3.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from harness import cpu_model

PROMPTS = [
    "def read_config(path):\n    \"\"\"",
    "The word 'harbour' means",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n",
    "A fortune cookie says:",
    "In computing, a hash table is",
    "Q: What is the capital of France?\nA:",
    "for i in range(10):\n",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/pretrain-tiny/latest", help="a leanseek checkpoint trained with MTP")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="run the engine without torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import leanseek
    from leanseek.data import TextTokenizer
    from leanseek.train.checkpoint import checkpoint_of

    try:
        source = checkpoint_of(Path(args.model))
    except FileNotFoundError:
        sys.exit(f"{args.model}: no checkpoint there. Make one with ./run.sh, or: leanseek pretrain --preset tiny "
                 "--data runs/data-builtin --out runs/pretrain-tiny")
    model = leanseek.load_hf(source)
    if not len(model.mtp):
        sys.exit(f"{args.model}: this model has no MTP module (num_nextn_predict_layers=0)")
    tok = TextTokenizer.load(source)
    bos = tok.token_id("<|bos|>")
    prompts = [[bos] + tok.encode(p) for p in PROMPTS]
    max_len = max(map(len, prompts)) + args.new_tokens
    engine = leanseek.Engine(model, tok, max_batch=len(prompts), max_len=max_len, compile=not args.eager)
    print(f"# {args.model}: {model.cfg.param_counts()}, {len(prompts)} prompts + {args.new_tokens} new tokens, "
          f"float32, {cpu_model()}, {args.threads} threads, {'eager' if args.eager else 'compiled'}, "
          f"torch {torch.__version__}")
    print(f"{'decoding':<18} {'sequences':>9} {'plain tok/s':>12} {'speculative':>12} {'speedup':>8} "
          f"{'accepted':>9} {'tokens/step':>12}")
    for name, params in [("greedy", {}), ("sampling t=1 p=.95", dict(temperature=1.0, top_p=0.95, seed=0))]:
        for batched in [False, True]:
            groups = [prompts] if batched else [[p] for p in prompts]

            def run(speculative: bool) -> tuple[float, list[list[int]]]:
                outs = []
                start = time.perf_counter()
                for group in groups:
                    outs += engine.generate(group, max_new_tokens=args.new_tokens, speculative=speculative,
                                            **params)
                return time.perf_counter() - start, outs

            run(False), run(True)  # warm-up and compilation
            t_plain, plain = min(run(False) for _ in range(2))
            engine.stats = dict.fromkeys(engine.stats, 0)
            t_spec, spec = min(run(True) for _ in range(2))
            rate = engine.acceptance_rate
            tokens = sum(map(len, plain))
            same = "" if params or plain == spec else "  (outputs differ!)"
            print(f"{name:<18} {len(groups[0]):>9} {tokens / t_plain:>12,.0f} {tokens / t_spec:>12,.0f} "
                  f"{t_plain / t_spec:>7.2f}x {rate:>9.1%} {1 + rate:>12.2f}{same}", flush=True)
    print("# sample (greedy, speculative):", repr(tok.decode(engine.generate(prompts[:1], max_new_tokens=40,
                                                                            speculative=True)[0])))


if __name__ == "__main__":
    main()
