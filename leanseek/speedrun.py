"""`leanseek speedrun`: from nothing to a reasoning assistant in one command, with a report card of what it cost.

Each stage writes one folder or file in RUNS_DIR and is skipped when that output is complete, so running the same
command again continues an interrupted speedrun where it stopped (the training stages resume mid-run):

  data/           the corpus tokenized, with its own BPE tokenizer            leanseek data
  pretrain/       the base model: next-token + MTP loss, aux-loss-free MoE    leanseek pretrain
  sft.jsonl       the SFT conversations (definitions, Python, greetings, sums with worked reasoning)
  sft/            the chat model                                              leanseek sft
  mtp/            (cpu) the chat model with its MTP module fitted to it       leanseek sft --train mtp
  eval-sft.json   held-out task accuracy before RL                            leanseek eval
  rl/             GRPO on the task with a rule-based reward                   leanseek rl
  eval-rl.json    held-out task accuracy after RL                             leanseek eval
  probes.json     sample conversations, definition recall, MTP acceptance, expert load, KV cache
  report.md       the report card, plots in plots/ (written again on every run, from the files above)

Presets are data (SPEEDRUNS). A stage is a subcommand: its module's `run` is called with the arguments its own
parser would give for the command the report lists (the training stages of a multi-device preset launch that
command under torchrun), so any stage can be rerun or changed by hand.

--dry-run checks a preset before it is paid for: every stage for a few steps, at the preset's model, vocabulary
and sequence lengths, through the same code, on whatever devices are here, in RUNS_DIR/dry-run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .atomic import write_text_atomic
from .console import table

SPEEDRUNS: dict[str, dict] = {
    # The speedrun test's: every stage, the whole report, in about a minute; the model learns little.
    "micro": dict(
        about="every stage in about a minute on a CPU (for tests: the model learns little)",
        devices=1, device="cpu", model="nano",
        data=dict(source=["builtin:python-docstrings"], vocab_size=1024, tokenizer_sample_mb=0.5),
        pretrain=dict(steps=30, batch_size=8, seq_len=128, eval_every=15, save_every=15, eval_tokens=8192),
        chats=dict(definitions=100, definition_repeats=2, python=0, greetings=40, sums=600),
        sft=dict(steps=20, batch_size=8, seq_len=128, mtp_weight=0, eval_every=10, save_every=10),
        mtp=dict(steps=4, batch_size=8, seq_len=128, lr=3e-3, eval_every=4, save_every=4),
        rl=dict(task="sums", steps=3, prompts=4, group=4, max_new_tokens=32, lr=1e-4, eval_every=3,
                eval_problems=16, save_every=3),
        eval=dict(problems=24, k=2, max_new_tokens=32),
        probes=dict(definitions=6, mtp_prompts=8, balance_tokens=4096, max_new_tokens=32),
    ),
    # ./run.sh: a 5.4M-parameter DeepSeek-V3-style model on the built-in corpus, within 20 minutes on 2 cores.
    # Most of the time goes to SFT, where the sums are learned (measured, greedy pass@1 after SFT: 400 steps of
    # 32 x 128 tokens at lr 1e-3, 4%; 1,200 steps of 16 x 128 at 2e-3, 26% to 100%). A definition is recalled only
    # after being seen several times, hence fewer definitions, repeated: taught-word F1 0.35 at 4 repeats, 0.82 at 8.
    # Pretraining and SFT leave the MTP loss out (a fifth of pretraining's time, a third of SFT's step; validation
    # bpb after pretraining 1.859 without it, 1.858 with it), then 600 steps fit the MTP module alone to the SFT
    # model: drafts accepted 98% (300 steps: 79%, or 98% had pretraining trained the module; unfitted 9%).
    "cpu": dict(
        about="the tiny model (5.4M parameters) on the built-in corpus, meant to take under 20 minutes on a 2-core CPU",
        devices=1, device="cpu", model="tiny",
        data=dict(source=["builtin"], vocab_size=4096, tokenizer_sample_mb=20),
        pretrain=dict(steps=450, batch_size=16, seq_len=256, mtp_weight=0, eval_every=150, save_every=150),
        chats=dict(definitions=500, definition_repeats=8, python=0, greetings=200, sums=16000),
        sft=dict(steps=1200, batch_size=16, seq_len=128, lr=2e-3, mtp_weight=0, eval_every=600, save_every=300),
        mtp=dict(steps=600, batch_size=16, seq_len=128, lr=3e-3, eval_every=600, save_every=300),
        rl=dict(task="sums", steps=50, prompts=16, group=8, max_new_tokens=64, lr=1e-4, eval_every=10,
                eval_problems=200, save_every=25),
        eval=dict(problems=300, k=4, max_new_tokens=64),
        probes=dict(definitions=50, mtp_prompts=64, balance_tokens=65536, max_new_tokens=96),
    ),
    # One H100/H200: the 99M `small` model, 1B pretraining tokens. The built-in corpus is some 20M tokens at this
    # vocabulary, so bring a larger one with --source, or it is repeated ~50 times.
    "gpu-1": dict(
        about="the small model (99M parameters, 61M active) on 1B tokens: one H100/H200",
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
    # Eight H100/H200s under torchrun: the 0.95B `base` model (0.27B active) on 4B tokens; bring a corpus of
    # billions of tokens with --source. FSDP: each GPU holds an eighth of the weights, gradients and AdamW state
    # (15 GB in float32 replicated), which leaves room for activations, and the CPU dry run (two processes in
    # 24 GB) can run the same path at the same size, where DDP would need 30 GB.
    "gpu-8": dict(
        about="the base model (0.95B parameters, 0.27B active) on 4B tokens: eight H100/H200s (torchrun, FSDP)",
        devices=8, device="H100", mfu=0.25, model="base",
        data=dict(source=["builtin"], vocab_size=32768, tokenizer_sample_mb=500),
        pretrain=dict(steps=15000, batch_size=256, seq_len=1024, micro_batch_size=16, fsdp=True, eval_every=1000,
                      save_every=1000),
        chats=dict(definitions=40000, definition_repeats=3, python=6000, greetings=500, sums=100000),
        sft=dict(steps=2000, batch_size=128, seq_len=512, micro_batch_size=16, fsdp=True, eval_every=500,
                 save_every=500),
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
    p.add_argument("--dry-run", action="store_true",
                   help="run every stage for a few steps at the preset's model, vocabulary and sequence lengths on "
                        "the devices here, in RUNS_DIR/dry-run (emptied first), and print each stage's time")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")


def flags(options: dict) -> list[str]:
    """{"batch_size": 16, "source": ["a", "b"], "fsdp": True} -> ["--batch-size", "16", "--source", "a", "b",
    "--fsdp"]; None and False are left out (argparse's defaults for them)."""
    out = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        out.append("--" + key.replace("_", "-"))
        if value is not True:
            out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


class Stage:
    """One step of the speedrun: a name, the output that shows it is complete, and how to make it: `leanseek
    SUBCOMMAND` with `args` (its positional and required arguments, as typed) and `options` (the preset's settings,
    by argparse destination), or `make`, a step the speedrun does itself."""

    def __init__(self, name: str, output: Path, subcommand: str | None = None, args: list[str] = (),
                 options: dict | None = None, make=None, devices: int = 1):
        self.name, self.output, self.make, self.devices = name, output, make, devices
        self.subcommand, self.args, self.options = subcommand, list(args), dict(options or {})

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

    def argv(self) -> list[str]:
        return [self.subcommand, *self.args, *flags(self.options)]

    def command(self) -> str:
        """The stage as a shell command ("" for steps the speedrun does itself)."""
        if self.subcommand is None:
            return ""
        launcher = ["torchrun", f"--nproc_per_node={self.devices}", "-m", "leanseek"] if self.devices > 1 \
            else ["leanseek"]
        return shlex.join(launcher + self.argv())

    def namespace(self) -> argparse.Namespace:
        """What `leanseek` parses from command(): the subcommand's parser reads the required arguments and fills
        in its defaults; the preset's options are set as they are, not printed and parsed again."""
        from .cli import COMMANDS

        module_name, _, extra = COMMANDS[self.subcommand]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"leanseek {self.subcommand}")
        module.add_arguments(parser, **extra)
        ns = parser.parse_args(self.args)
        for key, value in self.options.items():
            if not hasattr(ns, key):
                raise ValueError(f"speedrun stage {self.name!r}: leanseek {self.subcommand} has no option "
                                 f"--{key.replace('_', '-')}")
            setattr(ns, key, value)
        ns.command, ns.run = self.subcommand, module.run  # as the leanseek command sets them
        return ns

    def run(self) -> None:
        if self.make is not None:
            self.make()
        elif self.devices > 1:  # one process per device; torch.distributed.run is torchrun, from this Python
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.devices}",
                                   "-m", "leanseek", *self.argv()])
            if done.returncode:
                sys.exit(f"leanseek speedrun: stage {self.name} failed (exit status {done.returncode}; its output "
                         f"is above): {self.command()}")
        else:
            args = self.namespace()
            args.run(args)


def stages(preset: dict, out: Path, source: list[str] | None = None, threads: int | None = None,
           chats: list[str] = ()) -> list[Stage]:
    from .tasks import parse_mix

    t = {"threads": threads}
    data = {k: v for k, v in preset["data"].items() if k != "source"}
    rl = {k: v for k, v in preset["rl"].items() if k != "task"}
    task, ev, devices = preset["rl"]["task"], preset["eval"], preset["devices"]
    chat_model = sft_model(preset)
    evaluated = parse_mix(task)[0][0].name  # a mix's first task is the one the report card follows

    def evaluate(model: str, result: str) -> Stage:
        return Stage(f"eval {model}", out / result, "eval",
                     [str(out / model), "--task", evaluated, "--json", str(out / result)],
                     {"problems": ev["problems"], "k": ev["k"], "max_new_tokens": ev["max_new_tokens"], "show": 0, **t})

    return [
        Stage("data", out / "data", "data", ["--source", *(source or preset["data"]["source"]), "--out",
                                             str(out / "data")], data),
        Stage("pretrain", out / "pretrain", "pretrain", ["--data", str(out / "data"), "--out", str(out / "pretrain")],
              {"preset": preset["model"], **preset["pretrain"], **t}, devices=devices),
        Stage("sft data", out / "sft.jsonl", make=lambda: write_chats(out / "sft.jsonl", preset["chats"], chats)),
        Stage("sft", out / "sft", "sft", ["--init", str(out / "pretrain"), "--data", str(out / "sft.jsonl"),
                                          "--out", str(out / "sft")], {**preset["sft"], **t}, devices=devices),
        *([Stage("mtp", out / "mtp", "sft", ["--init", str(out / "sft"), "--data", str(out / "sft.jsonl"),
                                             "--out", str(out / "mtp")], {"train": "mtp", **preset["mtp"], **t})]
          if "mtp" in preset else []),
        evaluate("sft", "eval-sft.json"),
        Stage("rl", out / "rl", "rl", ["--init", str(out / chat_model), "--out", str(out / "rl"), "--task", task],
              {**rl, **t}),
        evaluate("rl", "eval-rl.json"),
        Stage("probes", out / "probes.json", make=lambda: _probes(out, preset)),
    ]


def sft_model(preset: dict) -> str:
    """The folder holding the SFT model GRPO starts from: `mtp` where SFT left out the MTP loss and a stage then
    fitted the MTP module alone (so that self-speculative drafts fit the model), else `sft`."""
    return "mtp" if "mtp" in preset else "sft"


def dry_run(preset: dict, devices: int, device: str) -> dict:
    """The preset as a check that every stage runs: its model, vocabulary and sequence lengths (what decides
    shapes and memory) on `devices` processes of `device` ("cpu" or a PEAK_TFLOPS name), each stage for two steps
    with small batches and small evaluations, the data from the first 5M characters of each source, training in
    the dtype the preset trains in on its GPUs. A multi-device preset keeps gradient accumulation (one sequence per
    micro-step). A small corpus's tokenizer can fall short of the vocabulary: the model is built at the preset's."""
    vocab = preset["data"]["vocab_size"]

    # a GPU preset trains in bf16 autocast (--dtype auto, on GPUs): so does its dry run, on a CPU too
    autocast = {"dtype": "bfloat16"} if preset["device"] != "cpu" else {}

    def train(options: dict) -> dict:
        micro = {"micro_batch_size": 1} if "micro_batch_size" in options else {}
        return {**options, "steps": 2, "batch_size": 2 * devices, **micro, "eval_every": 2, "save_every": 2,
                "keep": 1, **autocast}

    p, c, rl = preset["pretrain"], preset["chats"], preset["rl"]
    where = f"{devices} x {device}" if devices > 1 else device
    return {**preset, "about": f"a dry run of {preset['about']}, on {where}", "devices": devices, "device": device,
            "data": {**preset["data"], "tokenizer_sample_mb": min(preset["data"]["tokenizer_sample_mb"], 10),
                     "max_mb_per_source": 5},
            "pretrain": {**train(p), "eval_tokens": 2 * p["seq_len"], "set": [f"vocab_size={vocab}"]},
            # enough conversations (some 40 tokens each) that the held-out twentieth fills an SFT window twice
            "chats": {"definitions": 40, "definition_repeats": 1, "python": min(c["python"], 20), "greetings": 20,
                      "sums": preset["sft"]["seq_len"]},
            "sft": train(preset["sft"]),
            **({"mtp": train(preset["mtp"])} if "mtp" in preset else {}),
            # an untrained model's rewards are all equal: its groups are kept, so that the update runs
            "rl": {**rl, "steps": 2, "prompts": 2, "group": 2, "eval_every": 2, "eval_problems": 4, "save_every": 2,
                   "keep": 1, "keep_zero_std": True, **autocast},
            "eval": {**preset["eval"], "problems": 4, "k": 2},
            "probes": {"definitions": 2, "mtp_prompts": 4, "balance_tokens": 2 * p["seq_len"], "max_new_tokens": 32}}


def dry_run_devices(preset: dict) -> tuple[int, str]:
    """Processes and device for a dry run here: the GPUs there are (at most the preset's number), else the CPU,
    with two processes for a multi-device preset so that its distributed path runs."""
    import torch

    if torch.cuda.is_available():
        return min(preset["devices"], torch.cuda.device_count()), preset["device"]
    return min(preset["devices"], 2), "cpu"


def write_chats(path: Path, counts: dict, files: list[str] = ()) -> None:
    """The SFT set as OpenAI messages JSONL, shuffled: leanseek.data.instructions' built-in exchanges in these
    counts (each definition `definition_repeats` times: a small model learns a definition only by seeing it
    several times), and the conversations of `files`. Single exchanges: joined into conversations of 1 to 3
    turns (measured), the sums came out worse (11% greedy pass@1 after SFT, 38% after GRPO, against 26% and 84%)
    and later turns no better."""
    import random

    from .data.chat import read_chats
    from .data.instructions import SUMS_THINK_RATE, definitions, greetings, python_answers, task_chats, tool_chats

    rng = random.Random(0)
    tools = counts.get("tools", 0)  # conversations that call the built-in define tool (for words never taught)
    taught = definitions(rng, counts["definitions"], taught_only=tools > 0)
    chats = taught * counts.get("definition_repeats", 1)
    chats += tool_chats(rng, tools, taught) if tools else []
    chats += python_answers(rng, counts["python"]) + greetings(rng, counts["greetings"])
    chats += task_chats(rng, "sums", counts["sums"], 0, counts.get("think_rate", SUMS_THINK_RATE))
    for file in files:
        chats += read_chats(file)
    rng.shuffle(chats)
    write_text_atomic(path, "".join(json.dumps(c if isinstance(c, dict) else {"messages": c}) + "\n" for c in chats))


def _probes(out: Path, preset: dict) -> None:
    from .eval.probes import run_probes

    write_text_atomic(out / "probes.json", json.dumps(run_probes(out, preset), indent=2) + "\n")


def expected_cost(preset: dict) -> dict:
    """Training FLOPs of the preset's pretraining, SFT and RL, and the time and dollars they take on its devices at
    its assumed MFU (GPU presets) -- an estimate, to be replaced by the report's measured figures."""
    from .device import default_price
    from .model.config import ModelConfig
    from .train.cost import PEAK_TFLOPS, forward_flops

    cfg = ModelConfig.preset(preset["model"], vocab_size=preset["data"]["vocab_size"])
    p, s, r = preset["pretrain"], preset["sft"], preset["rl"]
    flops = {name: cfg.flops_per_token(t["seq_len"], include_mtp=t.get("mtp_weight", 1) > 0) * t["steps"]
             * t["batch_size"] * t["seq_len"] for name, t in (("pretrain", p), ("sft", s))}
    if "mtp" in preset:
        m = preset["mtp"]
        flops["mtp"] = cfg.mtp_training_flops_per_token(m["seq_len"]) * m["steps"] * m["batch_size"] * m["seq_len"]
    # RL: each sampled token costs a forward; the update a forward and a forward-backward over ~96-token sequences
    samples = r["steps"] * r["prompts"] * r["group"] * 96
    flops["rl"] = forward_flops(cfg, 96, 2 * samples) + cfg.flops_per_token(96, include_mtp=False) * samples
    total = sum(flops.values())
    out = {"flops": flops, "total_flops": total}
    if preset["device"] != "cpu":
        seconds = total / (preset["devices"] * PEAK_TFLOPS[preset["device"]] * 1e12 * preset["mfu"])
        out.update(hours=seconds / 3600, device_hours=seconds * preset["devices"] / 3600,
                   dollars=seconds * preset["devices"] / 3600 * default_price("cuda"))
    return out


def run(args) -> None:
    preset = SPEEDRUNS[args.preset]
    out = Path(args.out)
    if args.dry_run:
        preset, out = dry_run(preset, *dry_run_devices(preset)), out / "dry-run"
    plan = stages(preset, out, args.source, args.threads, args.chats)
    if args.plan:
        print_plan(args.preset + (" --dry-run" if args.dry_run else ""), preset, plan)
        return
    if preset["devices"] > 1 and "WORLD_SIZE" in os.environ:
        sys.exit("leanseek speedrun: run it as a plain command; it launches torchrun for the training stages itself")
    from .data.chat import read_chats

    for file in args.chats:  # bad conversations fail now, not after pretraining
        read_chats(file)
    settings = {"preset": args.preset, "source": args.source, "chats": args.chats}
    prepare_folder(out, {**settings, "dry_run": True} if args.dry_run else settings)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    from .eval.report import git_commit, write_report

    total = time.perf_counter()
    for i, stage in enumerate(plan, 1):
        if stage.done():
            print(f"[speedrun {i}/{len(plan)}] {stage.name}: complete, skipped ({stage.output})", flush=True)
            continue
        print(f"\n[speedrun {i}/{len(plan)}] {stage.name}" + (f": {stage.command()}" if stage.subcommand else ""),
              flush=True)
        t0 = time.perf_counter()
        stage.run()
        seconds = time.perf_counter() - t0
        print(f"[speedrun {i}/{len(plan)}] {stage.name}: done in {seconds:.1f} s", flush=True)
        timings[stage.name] = {"seconds": seconds, "command": stage.command(), "commit": git_commit()}
        write_text_atomic(timings_path, json.dumps(timings, indent=2) + "\n")
    report = write_report(out, args.preset, preset, plan)
    print("\n" + table([[name, f"{t['seconds']:.1f}"] for name, t in timings.items()]
                       + [["total", f"{sum(t['seconds'] for t in timings.values()):.1f}"]], ["stage", "seconds"]))
    if args.dry_run:
        p, s = preset["pretrain"], preset["sft"]
        extra = [x for key in ("source", "chats") if settings[key] for x in (f"--{key}", *settings[key])]
        print(f"\ndry run of speedrun {args.preset} passed in {time.perf_counter() - total:.0f}s: every stage ran "
              f"the {preset['model']} model with its {preset['data']['vocab_size']:,}-token vocabulary at sequences "
              f"of {p['seq_len']:,} (pretraining) and {s['seq_len']:,} (SFT) on {preset['devices']} x "
              f"{preset['device']}. Its files: {out}; report card: {report}.\nThe real run: "
              + shlex.join(["leanseek", "speedrun", "--preset", args.preset, *extra, "--out", str(args.out)]))
        return
    print(f"\nspeedrun {args.preset} complete in {time.perf_counter() - total:.0f}s this time "
          f"({sum(t['seconds'] for t in timings.values()):.0f}s of stages in all). Report card: {report}")
    print(f"Talk to it:\n  leanseek chat {out / 'rl'}\n  leanseek serve {out / 'rl'}    "
          "# then open http://127.0.0.1:8000 (web chat) or point any OpenAI client at http://127.0.0.1:8000/v1")


def prepare_folder(out: Path, settings: dict) -> None:
    """Make RUNS_DIR, or check that it holds a speedrun with these settings. A dry run's folder is emptied first:
    a dry run proves every stage each time."""
    made = out / "speedrun.json"
    if settings.get("dry_run") and out.exists():
        if not (made.is_file() and json.loads(made.read_text()).get("dry_run")):
            raise ValueError(f"{out} is not a dry run's folder; move it away or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if made.is_file() and json.loads(made.read_text()) != settings:
        raise ValueError(f"{out} holds a speedrun with other settings ({made.read_text().strip()}); "
                         f"continue it with those, or choose another --out")
    write_text_atomic(made, json.dumps(settings) + "\n")


def print_plan(name: str, preset: dict, plan: list[Stage]) -> None:
    from .device import default_price

    print(f"speedrun {name}: {preset['about']}")
    for i, stage in enumerate(plan, 1):
        print(f"  {i}. {stage.name:<9} -> {stage.output}" + (f"\n       {stage.command()}" if stage.subcommand else ""))
    est = expected_cost(preset)
    print(f"training FLOPs: {est['total_flops']:.3g} (" + ", ".join(f"{k} {v:.2g}" for k, v in est["flops"].items())
          + ")")
    if "hours" in est:
        print(f"expected: {_duration(est['hours'] * 3600)} on {preset['devices']} x {preset['device']} at "
              f"{preset['mfu']:.0%} MFU (training stages; evaluation adds minutes), {est['device_hours']:.2f} "
              f"device-hours, ${est['dollars']:.0f} at ${default_price('cuda'):g} per device-hour")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{math.ceil(seconds / 60)} min"
