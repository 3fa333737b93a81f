"""`leanseek distill`: DeepSeek-R1's distillation (section 2.4) in small. The teacher samples reasoning traces for a
task's training problems; only verified-correct ones are kept (rejection sampling); a smaller student, made from
a preset with the teacher's tokenizer, is trained on them by SFT. Then both are evaluated on the held-out set.

RUN_DIR gets traces.jsonl (the kept conversations), student-init/ (the untrained student), the SFT run itself
(checkpoints/, latest, metrics.jsonl) and distill.json (teacher and student pass@1). Each part is reused when it
is already complete, so an interrupted distillation continues.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..data.tokenizer import TextTokenizer
from ..device import add_device_arguments, inference_dtype, use_device
from ..eval.tasks import complete, evaluate
from ..infer.engine import Engine
from ..model.config import ModelConfig
from ..model.hf import load_hf, read_config, save_hf
from ..model.transformer import Transformer
from ..tasks import get_task, split_completion
from .checkpoint import checkpoint_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="the teacher's run folder or checkpoint")
    p.add_argument("--student-preset", required=True, help="a smaller preset, e.g. nano")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--problems", type=int, default=4000, help="training problems the teacher attempts")
    p.add_argument("--samples", type=int, default=2, help="teacher samples per problem")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=800, help="student SFT steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-problems", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)


def traces(teacher: Path, task, args, device: torch.device) -> list[list[dict]]:
    """The teacher's verified-correct completions as conversations (the first correct sample of each problem)."""
    model, tokenizer = load_hf(teacher, dtype=inference_dtype(device), device=device), TextTokenizer.load(teacher)
    engine = Engine(model, tokenizer, max_batch=128, max_len=128 + args.max_new_tokens)
    problems = task.train_set(args.problems, args.seed + 1)
    samples = complete(engine, tokenizer, task, problems, samples=args.samples, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    chats = []
    for problem, row in zip(problems, samples):
        right = next((s for s in row if s.verdict.correct), None)
        if right is not None:
            reasoning = split_completion(tokenizer.decode(right.tokens))[0]
            chats.append([{"role": "user", "content": problem.prompt},
                          {"role": "assistant", "content": right.verdict.answer, "reasoning_content": reasoning}])
    return chats


def run(args) -> dict:
    """Distill, print the result, and return it."""
    from .loop import add_arguments as sft_arguments
    from .loop import run as train

    device = use_device(args)
    task = get_task(args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = checkpoint_of(Path(args.teacher))
    tokenizer = TextTokenizer.load(teacher)
    kept = out / "traces.jsonl"
    if not kept.exists():
        chats = traces(teacher, task, args, device)
        if not chats:
            raise ValueError(f"{teacher}: the teacher solved none of {args.problems} problems; nothing to distill")
        write_text_atomic(kept, "".join(json.dumps({"messages": c}) + "\n" for c in chats))
    student_init = out / "student-init"
    if not (student_init / "model.safetensors").exists():
        teacher_cfg = read_config(teacher)
        torch.manual_seed(args.seed)
        cfg = ModelConfig.preset(args.student_preset, vocab_size=teacher_cfg.vocab_size,
                                 bos_token_id=teacher_cfg.bos_token_id, eos_token_id=teacher_cfg.eos_token_id)
        save_hf(Transformer(cfg), student_init)
        tokenizer.save(student_init)
    parser = argparse.ArgumentParser()
    sft_arguments(parser, "sft")
    train(parser.parse_args(["--init", str(student_init), "--data", str(kept), "--out", str(out),
                             "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                             "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--seed", str(args.seed),
                             "--save-every", str(max(1, args.steps // 4)), "--eval-every", str(args.steps),
                             "--device", args.device]))
    test = task.test_set(args.eval_problems)
    result = {"traces": sum(1 for _ in kept.open()), "problems": args.problems}
    for name, path in (("teacher", teacher), ("student", checkpoint_of(out))):
        model = load_hf(path, dtype=inference_dtype(device), device=device)
        engine = Engine(model, tokenizer, max_batch=128, max_len=128 + args.max_new_tokens)
        result[name] = {"pass@1": evaluate(engine, tokenizer, task, test, max_new_tokens=args.max_new_tokens)[0]
                        ["all"]["pass@1"],
                        "parameters": model.cfg.param_counts().total}
    result["student/teacher"] = result["student"]["pass@1"] / max(result["teacher"]["pass@1"], 1e-9)
    write_text_atomic(out / "distill.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"student: {out}/latest; {result['traces']} kept traces in {out}/traces.jsonl")
    return result
