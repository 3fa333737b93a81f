"""`leanseek eval`: a model on a task's held-out problems. Greedy pass@1; with k samples per problem, sampled
pass@1 (the mean over samples), pass@k (some sample right) and maj@k (the most common answer right); the mean
completion length and the format rate; overall and by difficulty bucket. A task that offers tools (its `tools`,
e.g. `define`) is answered in multi-turn rollouts: the model's calls are run and it goes on (see `rollouts`)."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


from ..atomic import write_text_atomic
from ..console import table
from ..data.chat import LEANSEEK_CHAT, encode_chat
from ..data.tokenizer import ASSISTANT, END_OF_TURN, TOOL, TOOL_CALL, TextTokenizer
from ..device import add_device_arguments, add_quantize_argument, inference_dtype, quantize_mode, use_device
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..serve.text import TextStream
from ..serve.toolcalls import tool_parser
from ..tasks import Problem, Task, Verdict, get_task
from ..tools import MAX_TOOL_ROUNDS, run_tool
from ..train.checkpoint import checkpoint_of
from ..train.cost import forward_flops

# tokens of tool turns (results and their markup) one reply may take in, over all its rounds, on top of its own
# max_new_tokens: define's three senses take well under half of it
TOOL_TOKENS = 256
ROUND_SEED = 1 << 56  # a continuation's seed: the reply's seed + round x this (round 0 keeps the reply's own)


@dataclass
class Sample:
    tokens: list[int]  # the reply; with tools, the tool turns run within it too
    verdict: Verdict
    own: int | None = None  # how many of the tokens the model wrote, when not all

    @property
    def length(self) -> int:
        return len(self.tokens) if self.own is None else self.own


@dataclass
class Rollout:
    """One reply, perhaps over several rounds of tool calls. tokens: all of it after the prompt; own: for each
    token, whether the model wrote it (not a tool turn the trainer inserted); final: the last round's tokens, the
    answer the task judges; calls: the tool calls run, {"name", "arguments", "result"} each; written: every call
    the model wrote, run or not (past the round bound or a budget), well-formed or not; malformed: those not parsed
    (never run); finished: the reply ended by itself (its end-of-turn token), not cut off by a budget."""

    tokens: list[int]
    own: list[bool]
    final: list[int]
    calls: list[dict] = field(default_factory=list)
    written: int = 0
    malformed: int = 0
    finished: bool = False


def task_tools(task: Task) -> list[dict] | None:
    """The tool definitions a task's prompts offer (its `tools`), or None."""
    return getattr(task, "tools", None)


def prompt_ids(tokenizer, problem: Problem, tools: list[dict] | None = None) -> list[int]:
    """The chat prompt of a problem, with the tools offered if any, ending with the generation prompt
    (<|assistant|>)."""
    return encode_chat(tokenizer, [{"role": "user", "content": problem.prompt}], add_generation_prompt=True,
                       tools=tools)[0]


def rollouts(engine: Engine, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             seeds: list[int] | None = None, offers: list[bool] | bool = False, max_rounds: int = MAX_TOOL_ROUNDS,
             tool_tokens: int = TOOL_TOKENS) -> list[Rollout]:
    """Replies to prompts (token ids ending with <|assistant|>), each generated until its end-of-turn token. Where
    `offers` (per prompt, or for all) says the tools are offered, a reply that ends with well-formed tool calls
    (leanseek's format) has them run (tools.run_tool) and goes on: `<|tool|>RESULT<|end|>` per call, the result
    encoded as text, then `<|assistant|>`, and the model continues; up to max_rounds rounds of calls, after which
    a reply's calls are not run and it ends. A malformed call is never run (a turn with no well-formed call ends
    the reply).

    Budgets: the model's own tokens over all rounds are at most max_new_tokens (what --max-new-tokens means for
    a single-turn reply, and what dr_grpo's constant normaliser counts); the tool turns, at most tool_tokens more.
    A reply that would pass either ends there, unfinished. The engine's context must hold a prompt,
    2 x max_new_tokens and tool_tokens (rollout_context). Every reply needing round k+1 is continued in one engine
    call, with its seed + k x ROUND_SEED."""
    stop = tokenizer.token_id(END_OF_TURN)
    n = len(prompts)
    offers = [offers] * n if isinstance(offers, bool) else list(offers)
    out = [Rollout([], [], []) for _ in range(n)]
    inserted = [0] * n
    new_parser = tool_parser(LEANSEEK_CHAT)
    active = list(range(n))
    for round in range(max_rounds + 1):
        budgets = {i: max_new_tokens - sum(out[i].own) for i in active}
        contexts = [prompts[i] + out[i].tokens for i in active]
        # one call for the round: each reply is cut to its own budget after, which a per-request generator makes
        # the same as sampling it with that limit
        limit = max(budgets.values(), default=0)
        outs = engine.generate(contexts, max_new_tokens=limit, temperature=temperature, stop=[stop],
                               seed=None if seeds is None else [seeds[i] + round * ROUND_SEED for i in active]) \
            if active else []
        going = []
        for i, o in zip(active, outs):
            o = o[:budgets[i]]
            r = out[i]
            r.tokens += o
            r.own += [True] * len(o)
            r.final = o
            r.finished = bool(o) and o[-1] == stop
            if not (r.finished and offers[i]):
                continue
            text = TextStream(tokenizer, [], chat=True).feed(o, final=True)[1]
            parser = new_parser()
            content = parser.feed(text)[0] + parser.finish()[0]
            malformed = content.count(TOOL_CALL)  # a malformed call stays in the text
            r.malformed += malformed
            r.written += malformed + len(parser.calls)
            if not parser.calls or round == max_rounds:
                continue
            if budgets[i] == len(o):  # no room left for an answer
                r.finished = False
                continue
            calls = [{"name": c.name, "arguments": c.arguments, "result": run_tool(c.name, c.arguments)}
                     for c in parser.calls]
            turns = [t for c in calls for t in [tokenizer.token_id(TOOL), *tokenizer.encode(c["result"]), stop]]
            turns.append(tokenizer.token_id(ASSISTANT))
            inserted[i] += len(turns)
            if inserted[i] > tool_tokens:  # no room for the results
                r.finished = False
                continue
            r.calls += calls
            r.tokens += turns
            r.own += [False] * len(turns)
            going.append(i)
        active = going
    return out


def rollout_context(prompt_tokens: int, max_new_tokens: int, tools: bool) -> int:
    """The engine context rollouts need for prompts of up to prompt_tokens: with tools, a continuation is
    generated with the round's largest budget left, on top of its tool turns."""
    return prompt_tokens + max_new_tokens + (max_new_tokens + TOOL_TOKENS if tools else 0)


def complete(engine: Engine, tokenizer, task: Task, problems: list[Problem], samples: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0) -> list[list[Sample]]:
    """`samples` completions of each problem (problem-major), each judged by the task (on its last round, for a
    task that offers tools). Each sampled completion draws from its own seed, so the results do not depend on
    batching."""
    tools = task_tools(task)
    prompts = [prompt_ids(tokenizer, p, tools) for p in problems for _ in range(samples)]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))] if temperature > 0 else None
    outs = rollouts(engine, tokenizer, prompts, max_new_tokens, temperature, seeds, offers=tools is not None)
    return [[Sample(o.tokens, task.verdict(p, tokenizer.decode(o.final)), sum(o.own))
             for o in outs[i * samples:(i + 1) * samples]] for i, p in enumerate(problems)]


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
               "length": _mean(greedy[i][0].length for i in idx)}
        if getattr(task, "graded", False):  # a reward between 0 and 1 (define's F1): its mean says more
            row["reward"] = _mean(greedy[i][0].verdict.reward() for i in idx)
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
    add_quantize_argument(p)


def run(args) -> dict:
    """Evaluate, print the table (and --show completions), write --json; returns the metrics."""
    device = use_device(args)
    task = get_task(args.task)
    path = checkpoint_of(Path(args.model))
    model = load_hf(path, dtype=inference_dtype(device), device=device, quantize=quantize_mode(args, device))
    tokenizer = TextTokenizer.load(path)
    problems = task.test_set(args.problems)
    engine = Engine(model, tokenizer, max_batch=args.batch,
                    max_len=rollout_context(256, args.max_new_tokens, task_tools(task) is not None))
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
          + ("; reward: the mean greedy reward" if "reward" in columns else "")
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
