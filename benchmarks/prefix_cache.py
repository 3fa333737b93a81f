"""Time to first token with and without prefix reuse, side by side on one engine configuration:
- turn 8 of a chat (each turn's prompt is the whole conversation so far: the last turn's prompt, its reply and a
  new user message), after turns 1-7 ran on the same engine;
- requests one after another that share a 1,000-token system prompt and differ in a short question.

    .venv/bin/python benchmarks/prefix_cache.py [--model runs/speedrun-cpu/rl | --preset tiny] [--threads 2]

Time to first token here is one engine step from submission: the prompt's prefill and the first token (that step
also decodes one token for the running request, in both columns alike). Greedy outputs are checked equal with
reuse on and off. Best of --repeats, each on a fresh engine.
"""

import argparse
import statistics
import time

import torch
from harness import cpu_model, model_or_preset

import leanseek


def first_token(engine: leanseek.Engine, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """Seconds from submitting to the first token, and the whole greedy reply."""
    start = time.perf_counter()
    rid = engine.submit(prompt, max_new_tokens=new)
    out, ttft = [], None
    while engine.pending:
        for o in engine.step():
            if o.request == rid:
                out += o.tokens
                ttft = ttft if ttft is not None else time.perf_counter() - start
    return ttft, out


def chat(engine: leanseek.Engine, turns: int, message: int, reply: int, vocab: int) -> tuple[float, list[int]]:
    """A conversation of `turns` turns (user messages of `message` random tokens, replies of `reply` tokens):
    the time to first token of the last turn, and its reply."""
    g = torch.Generator().manual_seed(0)
    prompt: list[int] = []
    for _ in range(turns):
        prompt += torch.randint(0, vocab, (message,), generator=g).tolist()
        ttft, out = first_token(engine, prompt, reply)
        prompt += out
    return ttft, out


def shared_system(engine: leanseek.Engine, system: int, question: int, requests: int,
                  vocab: int) -> tuple[float, list[list[int]]]:
    """Requests one after another with one system prompt: the median time to first token of all but the first,
    and every reply."""
    g = torch.Generator().manual_seed(1)
    head = torch.randint(0, vocab, (system,), generator=g).tolist()
    times, outs = [], []
    for _ in range(requests):
        ttft, out = first_token(engine, head + torch.randint(0, vocab, (question,), generator=g).tolist(), 16)
        times.append(ttft)
        outs.append(out)
    return statistics.median(times[1:]), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a run folder or checkpoint (default: a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = model_or_preset(args.model, args.preset)
    vocab = model.cfg.vocab_size
    print(f"model: {args.model or 'random ' + args.preset} ({model.cfg.num_hidden_layers} layers, hidden "
          f"{model.cfg.hidden_size}); CPU: {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    cases = [("chat, turn 8 (8 x 60-token messages, 64-token replies)", lambda e: chat(e, 8, 60, 64, vocab)),
             ("1,000-token system prompt + 20-token question", lambda e: shared_system(e, 1000, 20, 8, vocab))]
    print("| case | prompt tokens reused | time to first token, reuse off | reuse on | speed-up |")
    print("|---|---|---|---|---|")
    for name, run in cases:
        best, outs, reused = {}, {}, 0
        for reuse in (False, True):
            times = []
            for _ in range(args.repeats):
                engine = leanseek.Engine(model, max_batch=1, max_len=args.max_len, prefix_cache=reuse)
                ttft, outs[reuse] = run(engine)
                times.append(ttft)
                reused = engine.stats["cached_tokens"] if reuse else reused
            best[reuse] = min(times)
        same = "same replies" if outs[False] == outs[True] else "REPLIES DIFFER"
        print(f"| {name} | {reused} in all ({same}) | {best[False] * 1e3:.1f} ms | {best[True] * 1e3:.1f} ms | "
              f"{best[False] / best[True]:.2f}x |")


if __name__ == "__main__":
    main()
