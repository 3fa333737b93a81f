"""Dev only: the time of a GRPO step of `leanseek rl` against TRL's GRPOTrainer, same model, task and settings,
side by side in one run. TRL is not a leanseek dependency: `pip install trl` first (checked with trl 1.16.0).

    .venv/bin/python benchmarks/trl_grpo_step.py [--model runs/sft-sums/latest] [--steps 6]

Both sample 16 sums problems x 8 completions of at most 64 tokens at temperature 1, reward them with the same
checker (TRL's reward function decodes the completion ids with leanseek's tokenizer, as its text drops the
<think> tokens), and take one AdamW step of the dapo loss (lr 1e-4, no KL, mu 1). The first step of each is
warm-up; the figure is the median of the rest, sampling and update together.
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


def trl_seconds(model_path: str, steps: int, threads: int) -> list[float]:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from leanseek.data import TextTokenizer
    from leanseek.tasks import get_task

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    task = get_task("sums")
    ours = TextTokenizer.load(model_path)
    problems = task.train_set(16 * steps, seed=0)
    by_prompt = {p.prompt: p for p in problems}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "key": p.prompt}
                              for p in problems])

    def reward(completions, completion_ids, key, **_):
        return [task.verdict(by_prompt[k], ours.decode(ids)).reward() for ids, k in zip(completion_ids, key)]

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    end = ours.token_id("<|end|>")
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(output_dir=tmp, num_generations=8, per_device_train_batch_size=128,
                            gradient_accumulation_steps=1, max_completion_length=64, temperature=1.0,
                            learning_rate=1e-4, beta=0.0, loss_type="dapo", num_iterations=1, max_steps=steps,
                            logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                            shuffle_dataset=False, seed=0, adam_beta2=0.95, weight_decay=0.0,
                            generation_kwargs={"eos_token_id": end, "pad_token_id": ours.pad_id})
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenizer.eos_token = "<|end|>"  # a turn ends there: TRL cuts completions at the tokenizer's EOS
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([start] + stamps, stamps)]
    return times


def leanseek_seconds(model_path: str, steps: int, threads: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "leanseek", "rl", "--init", model_path, "--task", "sums", "--out", tmp,
               "--steps", str(steps), "--prompts", "16", "--group", "8", "--max-new-tokens", "64", "--lr", "1e-4",
               "--loss-type", "dapo", "--keep-zero-std", "--eval-every", "100000", "--eval-problems", "1",
               "--save-every", "100000", "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows if "seconds" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/sft-sums/latest")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import trl

    ours = leanseek_seconds(args.model, args.steps, args.threads)
    theirs = trl_seconds(args.model, args.steps, args.threads)
    a, b = statistics.median(ours[1:]), statistics.median(theirs[1:])
    print(f"# GRPO step, 16 x 8 samples of <= 64 tokens, {args.model}, {cpu_model()}, {args.threads} threads, torch "
          f"{torch.__version__}, trl {trl.__version__}")
    print(f"leanseek rl          {a:6.2f} s/step   (steps: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"trl GRPOTrainer      {b:6.2f} s/step   (steps: {', '.join(f'{x:.1f}' for x in theirs)})")
    print(f"leanseek is {b / a:.2f}x faster")


if __name__ == "__main__":
    main()
