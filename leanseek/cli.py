"""The `leanseek` command: one entry point, a subcommand per job.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args)`; this file only
lists them. `run` does the whole job, printing included, so other code (the speedrun) can call it directly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, help, keyword arguments of the module's add_arguments)
COMMANDS: dict[str, tuple[str, str, dict]] = {
    "presets": ("leanseek.model.catalog", "parameters, FLOPs and KV-cache size of every preset", {}),
    "info": ("leanseek.model.describe", "shape and accounting of a preset, a model folder or a config.json", {}),
    "init": ("leanseek.model.create", "write a randomly initialised model as a Hugging Face folder", {}),
    "check": ("leanseek.model.check", "load a Hugging Face folder, run it, and compare with transformers", {}),
    "data": ("leanseek.data.prepare", "tokenize text sources into training shards (and train the tokenizer)", {}),
    "pretrain": ("leanseek.train.loop", "train a base model on `leanseek data` shards (resumes; torchrun-ready)",
                 {"stage": "pretrain"}),
    "rl": ("leanseek.rl.trainer", "GRPO with rule-based rewards on a verifiable task (resumes)", {}),
    "chat": ("leanseek.serve.terminal", "talk to a model in the terminal (streaming, /reset, /temperature, /think)",
             {}),
    "serve": ("leanseek.serve.server", "an OpenAI-compatible server over the engine", {}),
    "distill": ("leanseek.train.distill", "rejection-sample a teacher's reasoning on a task, SFT a smaller student",
                {}),
    "eval": ("leanseek.eval.tasks", "pass@1, pass@k, maj@k, length and format rate on a task's held-out set", {}),
    "sft": ("leanseek.train.loop", "fine-tune a checkpoint on chats, the loss on the assistant's tokens "
                                   "(resumes; torchrun-ready)", {"stage": "sft"}),
    "export": ("leanseek.train.export", "write a run's model (sharded or not) as a Hugging Face folder", {}),
    "speedrun": ("leanseek.speedrun", "corpus -> tokenizer -> pretrain -> SFT -> GRPO -> eval -> report.md, "
                                      "each stage skipped when already complete", {}),
    "cost": ("leanseek.train.cost", "estimate the device-hours and dollars of a training run never made", {}),
}


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; only `command`'s module is imported (all of them when None), so that a subcommand
    starts without loading what the others need."""
    ap = argparse.ArgumentParser(prog="leanseek", description="DeepSeek-V3-style models, trained and served cheaply.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (module_name, help, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if command in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(p, **options)
            p.set_defaults(run=module.run)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(argv[0] if argv and argv[0] in COMMANDS else "")
    args = ap.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and CheckpointError are ValueErrors
        ap.exit(2, f"leanseek {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
