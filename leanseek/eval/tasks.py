"""`leanseek eval`: a model on a task's held-out problems. Greedy pass@1; with k samples per problem, sampled
pass@1 (the mean over samples), pass@k (some sample right) and maj@k (the most common answer right); the mean
completion length and the format rate; overall and by difficulty bucket."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path


from ..atomic import write_text_atomic
from ..console import table
from ..data.chat import encode_chat
from ..data.tokenizer import END_OF_TURN, TextTokenizer
from ..device import add_device_arguments, inference_dtype, use_device
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..tasks import Problem, Task, Verdict, get_task
from ..train.checkpoint import checkpoint_of
from ..train.cost import forward_flops


@dataclass
class Sample:
    tokens: list[int]
    verdict: Verdict


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """The chat prompt of a problem, ending with the generation prompt (<|assistant|>)."""
    return encode_chat(tokenizer, [{"role": "user", "content": problem.prompt}], add_generation_prompt=True)[0]


def complete(engine: Engine, tokenizer, task: Task, problems: list[Problem], samples: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0) -> list[list[Sample]]:
    """`samples` completions of each problem (problem-major), each judged by the task. Each sampled completion
    draws from its own seed, so the results do not depend on batching."""
    prompts = [prompt_ids(tokenizer, p) for p in problems for _ in range(samples)]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))] if temperature > 0 else None
    outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seeds,
                           stop=[tokenizer.token_id(END_OF_TURN)])
    return [[Sample(o, task.verdict(p, tokenizer.decode(o))) for o in outs[i * samples:(i + 1) * samples]]
            for i, p in enumerate(problems)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c are right (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    out = 1.0
    for i in range(n - c + 1, n + 1):
        out *= 1 - k / i
    return 1 - out


def summarise(task: Task, problems: list[Problem], greedy: list[list[Sample]],
              sampled: list[list[Sample]] | None = None) -> dict[str, dict[str, float]]:
    """Metrics overall ("all") and per bucket: greedy pass@1, format rate and mean length (greedy), and with
    samples: pass@1 (sampled), pass@k, maj@k."""
    groups = defaultdict(list)
    for i, p in enumerate(problems):
        groups["all"].append(i)
        groups[p.bucket].append(i)
    out = {}
    for name, idx in groups.items():
        row = {"n": len(idx),
               "pass@1": _mean(greedy[i][0].verdict.correct for i in idx),
               "format": _mean(greedy[i][0].verdict.formatted for i in idx),
               "length": _mean(len(greedy[i][0].tokens) for i in idx)}
        if sampled:
            k = len(sampled[0])
            row["pass@1 sampled"] = _mean(s.verdict.correct for i in idx for s in sampled[i])
            row[f"pass@{k}"] = _mean(pass_at_k(k, sum(s.verdict.correct for s in sampled[i]), k) for i in idx)
            row[f"maj@{k}"] = _mean(_majority_right(task, problems[i], sampled[i]) for i in idx)
        out[name] = row
    return out


def evaluate(engine: Engine, tokenizer, task: Task, problems: list[Problem], k: int = 0, temperature: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0) -> tuple[dict[str, dict[str, float]], list[list[Sample]]]:
    """summarise() of greedy completions and, with k, of k sampled ones per problem; and the greedy ones."""
    greedy = complete(engine, tokenizer, task, problems, max_new_tokens=max_new_tokens)
    sampled = (complete(engine, tokenizer, task, problems, samples=k, temperature=temperature,
                        max_new_tokens=max_new_tokens, seed=seed) if k else None)
    return summarise(task, problems, greedy, sampled), greedy


def _majority_right(task: Task, problem: Problem, samples: list[Sample]) -> bool:
    answers = Counter(s.verdict.answer for s in samples if s.verdict.answer)
    return bool(answers) and task.check(problem, answers.most_common(1)[0][0])


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder or checkpoint")
    p.add_argument("--task", required=True)
    p.add_argument("--problems", type=int, default=500, help="held-out problems (the same first ones each time)")
    p.add_argument("--k", type=int, default=8, help="samples per problem for pass@k and maj@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="sequences decoded at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument("--show", type=int, default=3, help="print this many greedy completions")
    add_device_arguments(p)


def run(args) -> dict:
    """Evaluate, print the table (and --show completions), write --json; returns the metrics."""
    device = use_device(args)
    task = get_task(args.task)
    path = checkpoint_of(Path(args.model))
    model, tokenizer = load_hf(path, dtype=inference_dtype(device), device=device), TextTokenizer.load(path)
    problems = task.test_set(args.problems)
    engine = Engine(model, tokenizer, max_batch=args.batch, max_len=256 + args.max_new_tokens)
    t0 = time.perf_counter()
    result, greedy = evaluate(engine, tokenizer, task, problems, k=args.k, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    seconds = time.perf_counter() - t0
    columns = list(result["all"])
    rows = [[bucket] + [f"{v[c]:.3f}" if isinstance(v[c], float) else v[c] for c in columns]
            for bucket, v in result.items()]
    print(f"{task.name} ({task.description}): {path}")
    print(table(rows, ["bucket"] + columns))
    print("pass@1: greedy; length: greedy completion tokens; format: well-formed completions"
          + (f"; sampled at temperature {args.temperature}, {args.k} per problem" if args.k else ""))
    if args.json:
        tokens = engine.processed_tokens
        write_text_atomic(Path(args.json), json.dumps({
            "task": task.name, "model": str(path), "k": args.k, "temperature": args.temperature,
            "metrics": result, "tokens": tokens, "flops": forward_flops(model.cfg, 256, tokens),
            "seconds": seconds}, indent=2) + "\n")
    for i in range(min(args.show, len(problems))):
        print(f"\n{problems[i].prompt} -> {tokenizer.decode(greedy[i][0].tokens)!r}")
    return result
