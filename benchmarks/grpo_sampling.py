"""The sampling half of a GRPO step: batched prefill against one prompt per prefill forward, side by side.

    .venv/bin/python benchmarks/grpo_sampling.py [--init RUN_DIR] [--prompts 16] [--group 8] [--new-tokens 64]
                                                 [--threads 2] [--repeats 3]

A GRPO step submits prompts x group requests at once: each prompt `group` times, prompts of different lengths.
The baseline prefills them one request per forward (what the engine did before batched prefill: an Engine whose
prefill budget holds one prompt); `batched` is the engine as `leanseek rl` builds it. Both sample the same
requests with the same seeds at temperature 1. Printed: the first engine step (every prefill and one decode step)
and the whole generate call, best of --repeats, and the baseline / batched ratio.

Without --init: the cpu speedrun's tiny model with random weights (its completions never stop early, so every one
runs --new-tokens) and random prompts of 12-18 tokens (the sums task's prompt lengths). With --init RUN_DIR: that
run's model and tokenizer, the sums task's prompts, stopping at end of turn.
"""

import argparse
import random
import time

import torch
from harness import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="a run folder or checkpoint (default: a random tiny model)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import leanseek
    from leanseek.rl.trainer import PREFILL_TOKENS

    stop = []
    if args.init:
        from leanseek.data import TextTokenizer
        from leanseek.data.tokenizer import END_OF_TURN
        from leanseek.eval.tasks import prompt_ids
        from leanseek.tasks import get_task
        from leanseek.train.checkpoint import checkpoint_of

        path = checkpoint_of(args.init)
        model, tokenizer = leanseek.load_hf(path), TextTokenizer.load(path)
        problems = random.Random(0).sample(get_task("sums").train_set(2000, 0), args.prompts)
        distinct = [prompt_ids(tokenizer, p) for p in problems]
        stop = [tokenizer.token_id(END_OF_TURN)]
    else:
        model = leanseek.Transformer(leanseek.ModelConfig.preset("tiny", vocab_size=4096)).eval()
        g = random.Random(0)
        distinct = [[g.randrange(4096) for _ in range(g.randint(12, 18))] for _ in range(args.prompts)]
    prompts = [p for p in distinct for _ in range(args.group)]
    seeds = list(range(len(prompts)))
    max_len = max(map(len, prompts)) + args.new_tokens
    budgets = {"one per forward": max(map(len, prompts)), "batched": PREFILL_TOKENS}

    def sample(budget: int) -> tuple[float, float, list]:
        engine = leanseek.Engine(model, max_batch=len(prompts), max_len=max_len, prefill_chunk=budget)
        start = time.perf_counter()
        for p, s in zip(prompts, seeds):
            engine.submit(p, max_new_tokens=args.new_tokens, temperature=1.0, seed=s, stop=stop)
        outs = {}
        for o in engine.step():
            outs.setdefault(o.request, []).extend(o.tokens)
        first = time.perf_counter() - start
        while engine.pending:
            for o in engine.step():
                outs.setdefault(o.request, []).extend(o.tokens)
        return first, time.perf_counter() - start, [outs[i] for i in sorted(outs)]

    times = {name: [] for name in budgets}
    samples = {}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
            for name, budget in budgets.items():
                first, total, samples[name] = sample(budget)
                times[name].append((first, total))
    best = {name: (min(t[0] for t in v), min(t[1] for t in v)) for name, v in times.items()}
    same = samples["one per forward"] == samples["batched"]
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.prompts} prompts x {args.group} samples, prompts of {min(map(len, distinct))}-"
          f"{max(map(len, distinct))} tokens, up to {args.new_tokens} new tokens; best of {args.repeats}")
    print(f"{'prefill':<16} {'first step s':>12} {'generate s':>11}")
    for name, (first, total) in best.items():
        print(f"{name:<16} {first:>12.3f} {total:>11.3f}")
    base, ours = best["one per forward"], best["batched"]
    print(f"ratio (one per forward / batched): first step {base[0] / ours[0]:.2f}x, generate "
          f"{base[1] / ours[1]:.2f}x; same samples: {same}")


if __name__ == "__main__":
    main()
