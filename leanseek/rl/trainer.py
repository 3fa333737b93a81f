"""`leanseek rl`: GRPO with rule-based rewards on a verifiable task (DeepSeekMath section 4.1, R1 section 2.2).

Each step draws `prompts` problems, samples `group` completions of each with the engine (temperature 1), rewards
them with the task's strict checker, turns the rewards into group-relative advantages, and takes `mu` AdamW steps
on the clipped objective (leanseek.rl.grpo). The reference model for the optional KL penalty is the starting
checkpoint, frozen. Problems and sampling seeds are functions of (seed, step), so a resumed run reproduces the
uninterrupted one. Held-out greedy accuracy is measured every `eval_every` steps.

A task that offers tools (`define`) is sampled in multi-turn rollouts (eval.tasks.rollouts): the engine stops at
the end of a turn that makes tool calls, the trainer runs them, appends the results as tool turns and lets the
model go on. The loss, the old and reference log-probabilities and the KL see only the model's own tokens: the
mask leaves out the tool results and the markup around them. `--task` may name a mix, `sums,define` or
`sums:3,define:1`: each step's prompts are dealt to the tasks in turn by weight, each problem is rewarded by its
own task, and the metrics are reported per task as well, so a skill that regresses shows.

The policy update runs in micro-batches of at most `micro_batch_tokens` tokens per forward-backward pass, with
gradients accumulated to exactly the whole batch's (grpo_loss's whole-batch normalisers), so memory does not grow
with prompts x group.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..console import metrics_line
from ..data.tokenizer import TextTokenizer
from ..eval.tasks import evaluate, prompt_ids, rollout_context, rollouts, task_tools
from ..device import add_device_arguments, default_price, use_device
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..tasks import Problem, Task, parse_mix
from ..train.checkpoint import (checkpoint_of, full_optimizer_state, latest_checkpoint, restore, rng_state,
                                save_checkpoint)
from ..train.cost import Ledger, detect_peak_tflops, forward_flops
from ..train.loop import append_metrics, truncate_metrics, write_json
from .grpo import LOSS_TYPES, SCALES, advantages, grpo_loss, kl_k3

# prompt tokens (padding included) per prefill forward of the sampler: a step's prompts x group requests are
# prefilled in a few large batches rather than one by one
PREFILL_TOKENS = 4096

RESUME_KEYS = ("init", "task", "prompts", "group", "max_new_tokens", "temperature", "lr", "loss_type", "scale",
               "eps_low", "eps_high", "beta", "mu", "format_reward", "keep_zero_std", "mask_truncated",
               "shuffle_rewards", "seed", "pool")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and output")
    g.add_argument("--init", required=True, help="the run folder (or checkpoint) to start from, e.g. an SFT run")
    g.add_argument("--task", required=True,
                   help="sums, addition, countdown or define; or a mix, e.g. sums,define or sums:3,define:1 (each "
                        "step's prompts dealt to the tasks in turn, by weight)")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, latest, metrics.jsonl, cost.json")
    g = p.add_argument_group("GRPO")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--prompts", type=int, default=16, help="problems per step")
    g.add_argument("--group", type=int, default=8, help="G: completions sampled per problem")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--loss-type", default="dapo", choices=LOSS_TYPES)
    g.add_argument("--scale", default="group", choices=SCALES, help="advantage scaling (none: Dr. GRPO)")
    g.add_argument("--eps-low", type=float, default=0.2)
    g.add_argument("--eps-high", type=float, default=None, help="clip-higher (DAPO: 0.28); default eps-low")
    g.add_argument("--beta", type=float, default=0.0, help="k3 KL penalty to the starting model (R1: 0.001)")
    g.add_argument("--mu", type=int, default=1, help="optimizer steps per batch of samples")
    g.add_argument("--format-reward", type=float, default=0.0, help="reward of a well-formed wrong answer")
    g.add_argument("--keep-zero-std", action="store_true", help="keep groups whose rewards are all equal")
    g.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut off unfinished")
    g.add_argument("--shuffle-rewards", action="store_true", help="control: rewards shuffled over the batch")
    g.add_argument("--pool", type=int, default=20000, help="training problems to draw prompts from")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("runtime")
    g.add_argument("--eval-every", type=int, default=25)
    g.add_argument("--eval-problems", type=int, default=200, help="held-out problems per evaluation")
    g.add_argument("--save-every", type=int, default=25)
    g.add_argument("--keep", type=int, default=2)
    g.add_argument("--micro-batch-tokens", type=int, default=8192,
                   help="tokens (padding included) per forward-backward pass of the policy update; gradients are "
                        "accumulated over as many passes as the batch needs, to the same result")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bf16 autocast for sampling and the update; auto: on GPUs, not on CPUs")
    add_device_arguments(g)


@dataclasses.dataclass
class Batch:
    """Sampled completions, ready for the loss: sequences [N, T], completion mask [N, T-1] over next-token
    positions, rewards and advantages [N]."""

    ids: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    adv: torch.Tensor
    stats: dict


@dataclasses.dataclass
class MicroBatch:
    """Some rows of a Batch for one forward-backward pass, cut to the longest of them: ids [n, t], mask [n, t-1],
    advantages [n], and once scored the old policy's (and the reference's) log-probabilities [n, t-1]."""

    ids: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def token_logps(model, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [N, T-1] of each next token under the model at `temperature` (as sampled), and the
    entropies of those distributions (detached). At least float32, whatever the model computes in."""
    logits = model(ids)[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def mix_name(mix: list[tuple[Task, int]]) -> str:
    """The canonical --task of a mix (what resuming compares): "sums,define" for equal weights."""
    same = len({w for _, w in mix}) == 1
    return ",".join(t.name if same else f"{t.name}:{w}" for t, w in mix)


def draw_problems(mix: list[tuple[Task, int]], pools: dict[str, list[Problem]], step: int, n: int,
                  seed: int) -> list[tuple[Task, Problem]]:
    """A step's n problems: prompt j goes to the task whose turn it is in the cycle of the mix's weights (counted
    over the whole run, so the shares hold whatever n), each task's drawn from its pool without repeats."""
    cycle = [t for t, w in mix for _ in range(w)]
    tasks = [cycle[(step * n + j) % len(cycle)] for j in range(n)]
    rng = random.Random(seed * 1_000_003 + step)
    drawn = {t.name: iter(rng.sample(pools[t.name], tasks.count(t))) for t, _ in mix}
    return [(t, next(drawn[t.name])) for t in tasks]


def sample_batch(engine: Engine, tokenizer: TextTokenizer, problems: list[tuple[Task, Problem]], args,
                 step: int) -> Batch:
    """G completions per (task, problem), multi-turn where the task offers tools, each rewarded by its own task;
    group advantages (zero-std groups dropped unless kept). The mask covers the model's own tokens only."""
    G = args.group
    seeds = [(args.seed * 1_000_003 + step) * 4096 + i for i in range(len(problems) * G)]
    tools = [task_tools(t) for t, _ in problems for _ in range(G)]
    prompts = [prompt_ids(tokenizer, p, tools[i * G]) for i, (_, p) in enumerate(problems) for _ in range(G)]
    outs = rollouts(engine, tokenizer, prompts, args.max_new_tokens, args.temperature, seeds,
                    offers=[t is not None for t in tools])
    owner = [problems[i // G][0] for i in range(len(outs))]
    verdicts = [t.verdict(problems[i // G][1], tokenizer.decode(o.final)) for i, (t, o) in enumerate(zip(owner, outs))]
    rewards = torch.tensor([v.reward(args.format_reward) for v in verdicts])
    if args.shuffle_rewards:  # the control: the same rewards, detached from what earned them
        rewards = rewards[torch.randperm(len(rewards), generator=torch.Generator().manual_seed(seeds[0]))]
    adv = advantages(rewards, G, args.scale)
    zero_std = rewards.view(-1, G).std(-1) == 0
    keep = torch.ones(len(outs), dtype=torch.bool) if args.keep_zero_std else ~zero_std.repeat_interleave(G)
    finished = torch.tensor([o.finished for o in outs])
    lengths = torch.tensor([sum(o.own) for o in outs], dtype=torch.float)
    stats = {"reward": float(rewards.mean()), "accuracy": sum(v.correct for v in verdicts) / len(verdicts),
             "format_rate": sum(v.formatted for v in verdicts) / len(verdicts), "length": float(lengths.mean()),
             "truncated": float((~finished).float().mean()), "zero_std_groups": float(zero_std.float().mean())}
    offered = [o for o, t in zip(outs, tools) if t is not None]
    if offered:
        stats["tool_calls"] = sum(len(o.calls) for o in offered) / len(offered)
        stats["malformed_calls"] = sum(o.malformed for o in offered) / len(offered)
    names = list(dict.fromkeys(t.name for t in owner))
    if len(names) > 1:
        for name in names:
            rows = [i for i, t in enumerate(owner) if t.name == name]
            stats[f"reward/{name}"] = float(rewards[rows].mean())
            stats[f"accuracy/{name}"] = sum(verdicts[i].correct for i in rows) / len(rows)
    T = max(len(p) + len(o.tokens) for p, o in zip(prompts, outs))
    ids = torch.full((len(outs), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(outs), T - 1)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ids[i, :len(p) + len(o.tokens)] = torch.tensor(p + o.tokens)
        if keep[i] and (finished[i] or not args.mask_truncated):
            # the positions that predict the model's own tokens; a tool turn's are left out
            mask[i, len(p) - 1:len(p) + len(o.tokens) - 1] = torch.tensor(o.own, dtype=mask.dtype)
    rows = mask.sum(-1) > 0
    return Batch(ids[rows], mask[rows], rewards[rows], adv[rows], stats)


def micro_batches(batch: Batch, budget: int, device) -> list[MicroBatch]:
    """The batch's rows, shortest first, packed into micro-batches of at most `budget` tokens (rows x the longest
    of them; a longer sequence goes alone). Each is cut to its longest sequence: the model is causal, so the
    padding beyond it changes nothing."""
    T = batch.ids.shape[1]
    lengths = (T - batch.mask.flip(-1).argmax(-1)).tolist()  # every row has a completion: its last is its end
    parts, rows = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if rows and (len(rows) + 1) * lengths[i] > budget:
            parts.append(rows)
            rows = []
        rows.append(i)
    parts.append(rows)
    out = []
    for rows in parts:
        t = max(lengths[i] for i in rows)
        index = torch.tensor(rows)
        out.append(MicroBatch(batch.ids[index, :t].to(device), batch.mask[index, :t - 1].to(device),
                              batch.adv[index].to(device)))
    return out


@torch.no_grad()
def score(parts: list[MicroBatch], old_policy, reference, temperature: float) -> None:
    """The old policy's and the reference's log-probabilities of each micro-batch's tokens."""
    for p in parts:
        p.old = token_logps(old_policy, p.ids, temperature)[0]
        p.ref = token_logps(reference, p.ids, temperature)[0] if reference is not None else None


def accumulate(model, parts: list[MicroBatch], args, precision=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """One forward-backward pass per micro-batch, gradients summed into .grad: the whole batch's loss and
    gradients, for every loss type. Returns the loss and the per-token statistics (tensors: no host sync).
    precision: the context of the forward passes (autocast); backward runs outside it, as autocast wants."""
    sequences = sum(len(p.ids) for p in parts)
    tokens = sum(p.mask.sum() for p in parts).clamp(min=1)
    eps_high = args.eps_low if args.eps_high is None else args.eps_high
    totals: dict[str, torch.Tensor] = {}
    for p in parts:
        with precision():
            logp, entropy = token_logps(model, p.ids, args.temperature)
            loss = grpo_loss(logp, p.old, p.ref, p.adv, p.mask, args.loss_type, args.eps_low, args.eps_high,
                             args.beta, args.max_new_tokens, sequences, tokens)
        loss.backward()
        with torch.no_grad():
            ratio, a, m = torch.exp(logp - p.old), p.adv[:, None], p.mask
            low = ((ratio < 1 - args.eps_low) & (a < 0)).to(m.dtype)
            high = ((ratio > 1 + eps_high) & (a > 0)).to(m.dtype)
            stats = {"loss": loss.detach(), "entropy": (entropy * m).sum() / tokens,
                     "clip_low": (low * m).sum() / tokens, "clip_high": (high * m).sum() / tokens,
                     "clip_region": ((low + high) * m).sum() / tokens}
            if p.ref is not None:
                stats["kl"] = (kl_k3(logp, p.ref) * m).sum() / tokens
        for k, v in stats.items():
            totals[k] = totals[k] + v if k in totals else v
    return totals


def held_out(engine, tokenizer, tests: list[tuple[Task, list[Problem]]], max_new_tokens: int) -> dict:
    """Greedy figures on each task's held-out problems: the first task's as eval_pass@1, eval_format,
    eval_length (and eval_reward for a graded task); with several tasks, each one's also as eval_pass@1/NAME..."""
    out = {}
    for n, (task, problems) in enumerate(tests):
        s = evaluate(engine, tokenizer, task, problems, max_new_tokens=max_new_tokens)[0]["all"]
        figures = {"eval_pass@1": s["pass@1"], "eval_format": s["format"], "eval_length": s["length"],
                   **({"eval_reward": s["reward"]} if "reward" in s else {})}
        if n == 0:
            out.update(figures)
        if len(tests) > 1:
            out.update({f"{k}/{task.name}": v for k, v in figures.items()})
    return out


def run(args) -> dict:
    if args.group < 2:
        raise ValueError(f"--group {args.group}: GRPO's advantages compare each completion with the others sampled "
                         "for the same prompt, so --group must be at least 2")
    if args.micro_batch_tokens < 1:
        raise ValueError(f"--micro-batch-tokens {args.micro_batch_tokens}: must be at least 1")
    mix = parse_mix(args.task)
    args.task = mix_name(mix)
    device = use_device(args)
    run_dir = Path(args.out)
    init = checkpoint_of(Path(args.init))
    tokenizer = TextTokenizer.load(init)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
    resume = latest_checkpoint(run_dir) if run_dir.exists() else None
    model = load_hf(resume or init, device=device).train()
    for r in model.routers():  # the routing bias stays as trained: RL has no balance objective of its own
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.requires_grad_(False)
    reference = load_hf(init, device=device).eval().requires_grad_(False) if args.beta else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    precision = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    # the weights stay float32; under autocast the matmuls, most of the FLOPs, run in bf16
    peak = detect_peak_tflops(device, torch.bfloat16 if bf16 else next(model.parameters()).dtype)[0]
    ledger = Ledger(devices=1, peak_tflops=peak, price_per_device_hour=default_price(device))
    start = 0
    if resume is not None:
        start, saved = restore(resume, run_args, RESUME_KEYS, model, optimizer)
        ledger = Ledger(**{**saved, "peak_tflops": ledger.peak_tflops,  # this device's, if resumed elsewhere
                           "price_per_device_hour": ledger.price_per_device_hour})
    pools = {t.name: t.train_set(args.pool, args.seed) for t, _ in mix}
    tests = [(t, t.test_set(args.eval_problems)) for t, _ in mix]
    # every prompt a step can draw fits the engine's context (tokenising 20,000 takes ~0.5 s; with the tools'
    # definitions, a few seconds)
    longest = max(len(prompt_ids(tokenizer, p, task_tools(t))) for t, test in tests for p in pools[t.name] + test)
    tools = any(task_tools(t) is not None for t, _ in mix)
    engine = Engine(model, tokenizer, max_batch=args.prompts * args.group,
                    max_len=rollout_context(longest, args.max_new_tokens, tools), prefill_chunk=PREFILL_TOKENS)
    metrics = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    truncate_metrics(metrics, start)
    if start == 0:
        with precision():
            append_metrics(metrics, {"step": 0, **held_out(engine, tokenizer, tests, args.max_new_tokens)})
    line: dict = {}
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"rl {args.task}", disable=None)
    for step in bar:
        t0 = time.perf_counter()
        problems = draw_problems(mix, pools, step, args.prompts, args.seed)
        before = engine.processed_tokens
        with torch.no_grad(), precision():
            batch = sample_batch(engine, tokenizer, problems, args, step)
        sampled = engine.processed_tokens - before
        t_sample = time.perf_counter() - t0
        model.train()
        line = {"step": step + 1, **batch.stats}
        if len(batch.ids):
            line.update(_update(model, reference, optimizer, params, batch, args, precision))
        dt = time.perf_counter() - t0
        tokens = int(batch.mask.sum())
        ledger.wall_seconds += dt
        ledger.tokens += tokens
        ledger.flops += rl_flops(model.cfg, batch.ids, sampled, args.mu, reference is not None)
        line.update({"sample_seconds": t_sample, "seconds": dt})
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with precision():
                line.update(held_out(engine, tokenizer, tests, args.max_new_tokens))
        append_metrics(metrics, line)
        bar.set_postfix(reward=f"{line['reward']:.2f}", len=f"{line['length']:.0f}",
                        **({"eval": f"{line['eval_pass@1']:.2f}"} if "eval_pass@1" in line else {}))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            state = {"args": run_args, "rng": rng_state(), "ledger": dataclasses.asdict(ledger)}
            save_checkpoint(run_dir, step + 1, model, full_optimizer_state(model, optimizer), state, tokenizer,
                            args.keep)
            write_json(run_dir / "cost.json", ledger.summary())
    bar.close()
    print(metrics_line(line))
    print(f"checkpoints: {run_dir}/checkpoints, newest: {run_dir}/latest; per step: {run_dir}/metrics.jsonl")
    return line


def rl_flops(cfg, ids: torch.Tensor, sampled: int, mu: int, reference: bool) -> float:
    """A step's FLOPs: sampling (a forward per token through the engine), the old (and reference) policy's
    forward over the batch, and mu forward-backward passes."""
    T = ids.shape[1]
    return (forward_flops(cfg, T, sampled + ids.numel() * (1 + reference))
            + cfg.flops_per_token(T, include_mtp=False) * ids.numel() * mu)


def _update(model, reference, optimizer, params, batch: Batch, args, precision) -> dict:
    """mu optimizer steps on one batch of samples, each over all its micro-batches; returns the last step's loss,
    entropy, KL and clip statistics."""
    parts = micro_batches(batch, args.micro_batch_tokens, model.lm_head.weight.device)
    with precision():
        score(parts, model, reference, args.temperature)
    out = {}
    for _ in range(args.mu):
        optimizer.zero_grad(set_to_none=True)
        out = {"kl": 0.0, **accumulate(model, parts, args, precision)}
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return {**{k: float(v) for k, v in out.items()}, "lr": args.lr}
