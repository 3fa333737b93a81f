"""`leanseek speedrun`: from nothing to a reasoning assistant in one command, with a report card of what it cost.

Each stage writes one folder or file in RUNS_DIR and is skipped when that output is complete, so running the same
command again continues an interrupted speedrun where it stopped (the training stages resume mid-run):

  data/           the corpus tokenized, with its own BPE tokenizer            leanseek data
  pretrain/       the base model: next-token + MTP loss, aux-loss-free MoE    leanseek pretrain
  sft.jsonl       the SFT conversations (definitions, Python, greetings, sums with worked reasoning)
  sft/            the chat model                                              leanseek sft
  eval-sft.json   held-out task accuracy before RL                            leanseek eval
  rl/             GRPO on the task with a rule-based reward                   leanseek rl
  eval-rl.json    held-out task accuracy after RL                             leanseek eval
  probes.json     sample conversations, definition recall, MTP acceptance, expert load, KV cache
  report.md       the report card, plots in plots/ (written again on every run, from the files above)

Presets are data (SPEEDRUNS); each stage's arguments are the CLI flags of its subcommand, and the report lists the
exact commands, so any stage can be rerun or changed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .atomic import write_text_atomic

SPEEDRUNS: dict[str, dict] = {
    # The speedrun test's: every stage, the whole report, in about a minute; the model learns little.
    "micro": dict(
        about="every stage in about a minute on a CPU (for tests: the model learns little)",
        devices=1, device="cpu", model="nano",
        data=dict(source=["builtin:python-docstrings"], vocab_size=1024, tokenizer_sample_mb=0.5),
        pretrain=dict(steps=30, batch_size=8, seq_len=128, eval_every=15, save_every=15, eval_tokens=8192),
        chats=dict(definitions=100, definition_repeats=2, python=0, greetings=40, sums=600),
        sft=dict(steps=20, batch_size=8, seq_len=128, eval_every=10, save_every=10),
        rl=dict(task="sums", steps=3, prompts=4, group=4, max_new_tokens=32, lr=1e-4, eval_every=3,
                eval_problems=16, save_every=3),
        eval=dict(problems=24, k=2, max_new_tokens=32),
        probes=dict(definitions=6, mtp_prompts=8, balance_tokens=4096, max_new_tokens=32),
    ),
    # ./run.sh: a 5.4M-parameter DeepSeek-V3-style model on the built-in corpus, within 20 minutes on 2 cores.
    # Most of the time goes to SFT, where the sums are learned (measured on this machine, greedy pass@1 after SFT:
    # 400 steps of 32 x 128 tokens at lr 1e-3, 4%; 1,200 steps of 16 x 128 at 2e-3, 26%, 28% and 61% in three
    # runs from 450 pretraining steps, 9% from 350). A definition is recalled only after being seen several times,
    # hence fewer definitions, repeated.
    "cpu": dict(
        about="the tiny model (5.4M parameters) on the built-in corpus: under 20 minutes on a 2-core CPU",
        devices=1, device="cpu", model="tiny",
        data=dict(source=["builtin"], vocab_size=4096, tokenizer_sample_mb=20),
        pretrain=dict(steps=450, batch_size=16, seq_len=256, eval_every=150, save_every=150),
        chats=dict(definitions=500, definition_repeats=4, python=0, greetings=200, sums=16000),
        sft=dict(steps=1200, batch_size=16, seq_len=128, lr=2e-3, eval_every=600, save_every=300),
        rl=dict(task="sums", steps=50, prompts=16, group=8, max_new_tokens=64, lr=1e-4, eval_every=10,
                eval_problems=200, save_every=25),
        eval=dict(problems=300, k=4, max_new_tokens=64),
        probes=dict(definitions=50, mtp_prompts=64, balance_tokens=65536, max_new_tokens=96),
    ),
    # One H100/H200: the 86M `small` model, 1B pretraining tokens. The built-in corpus is some 20M tokens at this
    # vocabulary, so bring a larger one with --source, or it is repeated ~50 times.
    "gpu-1": dict(
        about="the small model (86M parameters, 48M active) on 1B tokens: one H100/H200",
        devices=1, device="H100", mfu=0.25, model="small",
        data=dict(source=["builtin"], vocab_size=32768, tokenizer_sample_mb=200),
        pretrain=dict(steps=15000, batch_size=64, seq_len=1024, eval_every=1000, save_every=1000),
        chats=dict(definitions=20000, definition_repeats=3, python=6000, greetings=500, sums=60000),
        sft=dict(steps=1500, batch_size=64, seq_len=512, eval_every=500, save_every=500),
        rl=dict(task="sums", steps=200, prompts=64, group=16, max_new_tokens=64, lr=5e-5, eval_every=25,
                eval_problems=500, save_every=50),
        eval=dict(problems=500, k=16, max_new_tokens=64),
        probes=dict(definitions=200, mtp_prompts=256, balance_tokens=262144, max_new_tokens=128),
    ),
    # Eight H100/H200s under torchrun: the 0.9B `base` model (0.21B active) on 4B tokens; bring a corpus of
    # billions of tokens with --source.
    "gpu-8": dict(
        about="the base model (0.89B parameters, 0.21B active) on 4B tokens: eight H100/H200s (torchrun)",
        devices=8, device="H100", mfu=0.25, model="base",
        data=dict(source=["builtin"], vocab_size=32768, tokenizer_sample_mb=500),
        pretrain=dict(steps=15000, batch_size=256, seq_len=1024, micro_batch_size=16, eval_every=1000,
                      save_every=1000),
        chats=dict(definitions=40000, definition_repeats=3, python=6000, greetings=500, sums=100000),
        sft=dict(steps=2000, batch_size=128, seq_len=512, micro_batch_size=16, eval_every=500, save_every=500),
        rl=dict(task="sums", steps=300, prompts=64, group=16, max_new_tokens=64, lr=3e-5, eval_every=25,
                eval_problems=500, save_every=50),
        eval=dict(problems=500, k=16, max_new_tokens=64),
        probes=dict(definitions=200, mtp_prompts=256, balance_tokens=262144, max_new_tokens=128),
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", choices=list(SPEEDRUNS))
    p.add_argument("--out", default="runs/speedrun", help="RUNS_DIR: every stage's output and report.md")
    p.add_argument("--source", nargs="+", help="pretrain on these instead of the preset's corpus (as leanseek data "
                                               "--source: builtin, files, folders, .jsonl, .parquet)")
    p.add_argument("--chats", nargs="+", default=[], help="add these conversations (OpenAI messages JSONL, with "
                                                         "optional reasoning_content) to the SFT set")
    p.add_argument("--plan", action="store_true", help="print the stages, their commands and the expected cost; "
                                                       "run nothing")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")


def flags(options: dict) -> list[str]:
    """{"batch_size": 16, "source": ["a", "b"]} -> ["--batch-size", "16", "--source", "a", "b"]."""
    out = []
    for key, value in options.items():
        out.append("--" + key.replace("_", "-"))
        out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


class Stage:
    """One step of the speedrun: a name, the output that shows it is complete, and how to make it."""

    def __init__(self, name: str, output: Path, argv: list[str] | None = None, make=None, devices: int = 1):
        self.name, self.output, self.argv, self.make, self.devices = name, output, argv, make, devices

    def done(self) -> bool:
        if self.output.suffix in (".json", ".jsonl"):
            return self.output.is_file()
        if (self.output / "manifest.json").is_file():  # a data folder
            return True
        from .train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(self.output) if self.output.is_dir() else None
        if latest is None:
            return False
        state = json.loads((latest / "trainer_state.json").read_text())
        return state["step"] >= state["args"]["steps"]

    def command(self) -> str:
        """The stage as a shell command ("" for stages the speedrun does itself)."""
        if self.argv is None:
            return ""
        launcher = ["torchrun", f"--nproc_per_node={self.devices}", "-m", "leanseek"] if self.devices > 1 \
            else ["leanseek"]
        return shlex.join(launcher + self.argv)

    def run(self) -> None:
        if self.make is not None:
            self.make()
        elif self.devices > 1:  # data-parallel training: one process per GPU
            subprocess.run(["torchrun", f"--nproc_per_node={self.devices}", "-m", "leanseek", *self.argv], check=True)
        else:
            from .cli import main

            main(self.argv)


def stages(preset: dict, out: Path, source: list[str] | None = None, threads: int | None = None,
           chats: list[str] = ()) -> list[Stage]:
    t = ["--threads", str(threads)] if threads else []
    data = {**preset["data"], **({"source": source} if source else {})}
    rl = preset["rl"]
    ev = preset["eval"]
    eval_argv = ["--task", rl["task"], "--problems", str(ev["problems"]), "--k", str(ev["k"]),
                 "--max-new-tokens", str(ev["max_new_tokens"]), "--show", "0", *t]
    devices = preset["devices"]
    return [
        Stage("data", out / "data", ["data", *flags(data), "--out", str(out / "data")]),
        Stage("pretrain", out / "pretrain", ["pretrain", "--data", str(out / "data"), "--out", str(out / "pretrain"),
                                             "--preset", preset["model"], *flags(preset["pretrain"]), *t],
              devices=devices),
        Stage("sft data", out / "sft.jsonl", make=lambda: write_chats(out / "sft.jsonl", preset["chats"], chats)),
        Stage("sft", out / "sft", ["sft", "--init", str(out / "pretrain"), "--data", str(out / "sft.jsonl"),
                                   "--out", str(out / "sft"), *flags(preset["sft"]), *t], devices=devices),
        Stage("eval sft", out / "eval-sft.json", ["eval", str(out / "sft"), *eval_argv,
                                                  "--json", str(out / "eval-sft.json")]),
        Stage("rl", out / "rl", ["rl", "--init", str(out / "sft"), "--out", str(out / "rl"), *flags(rl), *t]),
        Stage("eval rl", out / "eval-rl.json", ["eval", str(out / "rl"), *eval_argv,
                                                "--json", str(out / "eval-rl.json")]),
        Stage("probes", out / "probes.json", make=lambda: _probes(out, preset)),
    ]


def write_chats(path: Path, counts: dict, files: list[str] = ()) -> None:
    """The SFT set as OpenAI messages JSONL, shuffled: leanseek.data.instructions' built-in exchanges in these
    counts (each definition `definition_repeats` times: a small model learns a definition only by seeing it
    several times), and the conversations of `files`. Single exchanges: joined into conversations of 1 to 3
    turns (measured), the sums came out worse (11% greedy pass@1 after SFT, 38% after GRPO, against 26% and 84%)
    and later turns no better."""
    import random

    from .data.chat import read_chats
    from .data.instructions import SUMS_THINK_RATE, definitions, greetings, python_answers, task_chats

    rng = random.Random(0)
    chats = definitions(rng, counts["definitions"]) * counts.get("definition_repeats", 1)
    chats += python_answers(rng, counts["python"]) + greetings(rng, counts["greetings"])
    chats += task_chats(rng, "sums", counts["sums"], 0, counts.get("think_rate", SUMS_THINK_RATE))
    for file in files:
        chats += read_chats(file)
    rng.shuffle(chats)
    write_text_atomic(path, "".join(json.dumps({"messages": c}) + "\n" for c in chats))


def _probes(out: Path, preset: dict) -> None:
    from .eval.probes import run_probes

    write_text_atomic(out / "probes.json", json.dumps(run_probes(out, preset), indent=2) + "\n")


def expected_cost(preset: dict) -> dict:
    """Training FLOPs of the preset's pretraining, SFT and RL, and the time and dollars they take on its devices at
    its assumed MFU (GPU presets) -- an estimate, to be replaced by the report's measured figures."""
    from .model.config import ModelConfig
    from .train.cost import PEAK_TFLOPS, forward_flops

    cfg = ModelConfig.preset(preset["model"], vocab_size=preset["data"]["vocab_size"])
    p, s, r = preset["pretrain"], preset["sft"], preset["rl"]
    flops = {"pretrain": cfg.flops_per_token(p["seq_len"]) * p["steps"] * p["batch_size"] * p["seq_len"],
             "sft": cfg.flops_per_token(s["seq_len"]) * s["steps"] * s["batch_size"] * s["seq_len"]}
    # RL: each sampled token costs a forward; the update a forward and a forward-backward over ~96-token sequences
    samples = r["steps"] * r["prompts"] * r["group"] * 96
    flops["rl"] = forward_flops(cfg, 96, 2 * samples) + cfg.flops_per_token(96, include_mtp=False) * samples
    total = sum(flops.values())
    out = {"flops": flops, "total_flops": total}
    if preset["device"] != "cpu":
        seconds = total / (preset["devices"] * PEAK_TFLOPS[preset["device"]] * 1e12 * preset["mfu"])
        out.update(hours=seconds / 3600, device_hours=seconds * preset["devices"] / 3600,
                   dollars=seconds * preset["devices"] / 3600 * 2.0)
    return out


def run(args) -> None:
    preset = SPEEDRUNS[args.preset]
    out = Path(args.out)
    plan = stages(preset, out, args.source, args.threads, args.chats)
    if args.plan:
        print_plan(args.preset, preset, plan)
        return
    if preset["devices"] > 1 and "WORLD_SIZE" in os.environ:
        sys.exit("leanseek speedrun: run it as a plain command; it launches torchrun for the training stages itself")
    from .data.chat import read_chats

    for file in args.chats:  # bad conversations fail now, not after pretraining
        read_chats(file)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"preset": args.preset, "source": args.source, "chats": args.chats}
    made = out / "speedrun.json"
    if made.is_file() and json.loads(made.read_text()) != settings:
        raise ValueError(f"{out} holds a speedrun with other settings ({made.read_text().strip()}); "
                         f"continue it with those, or choose another --out")
    write_text_atomic(made, json.dumps(settings) + "\n")
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    from .eval.report import git_commit, write_report

    total = time.perf_counter()
    for i, stage in enumerate(plan, 1):
        if stage.done():
            print(f"[speedrun {i}/{len(plan)}] {stage.name}: complete, skipped ({stage.output})", flush=True)
            continue
        print(f"\n[speedrun {i}/{len(plan)}] {stage.name}" + (f": {stage.command()}" if stage.argv else ""),
              flush=True)
        t0 = time.perf_counter()
        stage.run()
        seconds = time.perf_counter() - t0
        timings[stage.name] = {"seconds": seconds, "command": stage.command(), "commit": git_commit()}
        write_text_atomic(timings_path, json.dumps(timings, indent=2) + "\n")
    report = write_report(out, args.preset, preset, plan)
    print(f"\nspeedrun {args.preset} complete in {time.perf_counter() - total:.0f}s this time "
          f"({sum(t['seconds'] for t in timings.values()):.0f}s of stages in all). Report card: {report}")
    print(f"Talk to it:\n  leanseek chat {out / 'rl'}\n  leanseek serve {out / 'rl'}    "
          "# then open http://127.0.0.1:8000 (web chat) or point any OpenAI client at http://127.0.0.1:8000/v1")


def print_plan(name: str, preset: dict, plan: list[Stage]) -> None:
    print(f"speedrun {name}: {preset['about']}")
    for i, stage in enumerate(plan, 1):
        print(f"  {i}. {stage.name:<9} -> {stage.output}" + (f"\n       {stage.command()}" if stage.argv else ""))
    est = expected_cost(preset)
    print(f"training FLOPs: {est['total_flops']:.3g} (" + ", ".join(f"{k} {v:.2g}" for k, v in est["flops"].items())
          + ")")
    if "hours" in est:
        print(f"expected: {_duration(est['hours'] * 3600)} on {preset['devices']} x {preset['device']} at "
              f"{preset['mfu']:.0%} MFU (training stages; evaluation adds minutes), {est['device_hours']:.2f} "
              f"device-hours, ${est['dollars']:.0f} at $2 per device-hour")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{math.ceil(seconds / 60)} min"
