"""leanseek sft, rl and eval end to end on a micro model: the SFT loss sees only assistant tokens, both stages
resume exactly, and eval reports every metric."""

import json
import random
import shutil
import sys

import pytest
import torch
from test_pretrain import command, losses, run

from leanseek.data.instructions import task_chats


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro model pretrained for 3 steps (the data fixture of test_pretrain, inlined)."""
    from leanseek.data import collect, train_tokenizer, write_shards

    root = tmp_path_factory.mktemp("post")
    docs, stats = collect(["builtin:python-topics"])
    tokenizer = train_tokenizer(iter(docs), 512)
    tokenizer.save(root / "data")
    write_shards(docs, tokenizer, root / "data", stats, val_fraction=0.05)
    run(command(root / "data", root / "base", 3))
    chats = task_chats(random.Random(0), "sums", 120, seed=0, think_rate=0.5)
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return root


def sft(base, out, steps, init=None):
    return [sys.executable, "-m", "leanseek", "sft", "--init", str(init or base / "base"),
            "--data", str(base / "chats.jsonl"),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--seq-len", "64", "--save-every", "3",
            "--eval-every", "3", "--eval-tokens", "256", "--peak-tflops", "1", "--threads", "1"]


def rl(init, out, steps):
    return [sys.executable, "-m", "leanseek", "rl", "--init", str(init), "--task", "sums", "--out", str(out),
            "--steps", str(steps), "--prompts", "2", "--group", "4", "--max-new-tokens", "6", "--pool", "50",
            "--eval-every", "2", "--eval-problems", "4", "--save-every", "1", "--keep", "5", "--keep-zero-std",
            "--mu", "2", "--beta", "0.04", "--threads", "1"]


def rewind(run_dir, to, copy):
    """A copy of a finished run as a kill right after checkpoint `to` would leave it."""
    shutil.copytree(run_dir, copy, symlinks=True)
    for ckpt in (copy / "checkpoints").glob("step-*"):
        if int(ckpt.name.removeprefix("step-")) > to:
            shutil.rmtree(ckpt)
    (copy / "latest").unlink()
    (copy / "latest").symlink_to(f"checkpoints/step-{to:06d}")
    return copy


def metric_lines(path):
    return [{k: v for k, v in json.loads(x).items() if "seconds" not in k and k not in ("tokens_per_s", "mfu")}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_sft_resumes_exactly_and_rl_too(base, tmp_path):
    run(sft(base, tmp_path / "sft", 6))
    run(sft(base, rewind(tmp_path / "sft", 3, tmp_path / "sft-resumed"), 6))
    assert losses(tmp_path / "sft") == losses(tmp_path / "sft-resumed")
    first = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    assert "initial_val_loss" in first and "unigram_val_bpb" not in first
    config = json.loads((tmp_path / "sft" / "latest" / "tokenizer_config.json").read_text())
    assert "<think>" in config["chat_template"]

    run(rl(tmp_path / "sft", tmp_path / "rl", 3))
    run(rl(tmp_path / "sft", rewind(tmp_path / "rl", 1, tmp_path / "rl-resumed"), 3))
    straight = metric_lines(tmp_path / "rl")
    assert straight == metric_lines(tmp_path / "rl-resumed")
    assert [x["step"] for x in straight] == [0, 1, 2, 3]
    for key in ("reward", "accuracy", "format_rate", "length", "entropy", "kl", "clip_region", "zero_std_groups"):
        assert key in straight[1], key
    assert "eval_pass@1" in straight[0] and "eval_pass@1" in straight[2]


def test_sft_train_mtp_fits_the_mtp_module_alone(base, tmp_path):
    """--train mtp: the MTP module (its own weights and its router's bias) learns on its loss; every other weight,
    the shared embedding and head, and the main routers' biases stay exactly as they were; the main loss is left
    out and the cost ledger counts the main model's forward up to its head."""
    from safetensors.torch import load_file

    from leanseek.model.config import ModelConfig

    run(sft(base, tmp_path / "sft", 3) + ["--mtp-weight", "0"])
    run(sft(base, tmp_path / "mtp", 3, init=tmp_path / "sft") + ["--train", "mtp"])
    before = load_file(tmp_path / "sft" / "latest" / "model.safetensors")
    after = load_file(tmp_path / "mtp" / "latest" / "model.safetensors")
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "mtp" / "latest" / "config.json").read_text()))
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(mtp_prefix) for k in changed)
    assert any(k.endswith("e_score_correction_bias") for k in changed)
    lines = [json.loads(x) for x in (tmp_path / "mtp" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["mtp"] < lines[0]["mtp"]
    assert not any("ce" in line for line in lines)  # the frozen main model's own loss is not computed
    ledger = json.loads((tmp_path / "mtp" / "cost.json").read_text())
    # the MTP head's FLOPs are counted only at the positions with a target (the prompts' are skipped)
    counted, head = cfg.mtp_training_flops_per_token(64) * 3 * 4 * 64, 6 * cfg.vocab_size * cfg.hidden_size * 3 * 4 * 64
    assert counted - head < ledger["flops"] < counted
    assert cfg.mtp_training_flops_per_token(64) < cfg.flops_per_token(64)


def test_sft_train_mtp_needs_an_mtp_loss(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        from leanseek.cli import main

        main(sft(base, tmp_path / "mtp", 2)[3:] + ["--train", "mtp", "--mtp-weight", "0"])
    assert "--train mtp: needs MTP modules" in capsys.readouterr().err


def test_eval_reports_every_metric(base, tmp_path):
    out = tmp_path / "eval.json"
    done = run([sys.executable, "-m", "leanseek", "eval", str(base / "base"), "--task", "sums", "--problems", "6",
                "--k", "3", "--max-new-tokens", "5", "--json", str(out), "--threads", "1"])
    assert "pass@1" in done.stdout and "maj@3" in done.stdout
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics["all"]) == {"n", "pass@1", "format", "length", "pass@1 sampled", "pass@3", "maj@3"}
    assert metrics["all"]["n"] == 6 and sum(v["n"] for k, v in metrics.items() if k != "all") == 6
    quantised = run([sys.executable, "-m", "leanseek", "eval", str(base / "base"), "--task", "sums", "--problems", "6",
                     "--max-new-tokens", "5", "--json", str(out), "--threads", "1", "--quantize", "int8"])
    assert "pass@1" in quantised.stdout and json.loads(out.read_text())["metrics"]["all"]["n"] == 6


def test_distill_keeps_only_verified_traces_and_trains_a_smaller_student(base, tmp_path, monkeypatch):
    """Rejection sampling keeps a problem's first correct sample and nothing from problems with none; the student
    is built from the smaller preset with the teacher's tokenizer, trained, and both are evaluated."""
    import argparse

    from leanseek.eval import tasks as eval_tasks
    from leanseek.model.hf import read_config
    from leanseek.tasks import Verdict
    from leanseek.train import distill

    calls = []

    def fake_complete(engine, tokenizer, task, problems, samples=1, temperature=0.0, max_new_tokens=64, seed=0):
        calls.append(samples)
        rows = []
        for i, p in enumerate(problems):
            good = tokenizer.encode_markup(f"<think>{task.reasoning(p)}</think>{p.answer}<|end|>")
            bad = tokenizer.encode_markup("<think></think>1<|end|>")
            right = Verdict(True, True, p.answer)
            wrong = Verdict(False, True, "1")
            row = [eval_tasks.Sample(bad, wrong)] * samples
            if i % 2 == 0 and samples > 1:  # even problems: the second sample is right
                row = [eval_tasks.Sample(bad, wrong), eval_tasks.Sample(good, right)]
            rows.append(row)
        return rows

    monkeypatch.setattr(distill, "complete", fake_complete)
    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    args = parser.parse_args(["--teacher", str(base / "base"), "--student-preset", "nano", "--task", "sums",
                              "--out", str(tmp_path / "d"), "--problems", "10", "--samples", "2", "--steps", "2",
                              "--batch-size", "2", "--seq-len", "32", "--eval-problems", "4", "--threads", "1"])
    result = distill.run(args)
    kept = [json.loads(x)["messages"] for x in (tmp_path / "d" / "traces.jsonl").read_text().splitlines()]
    assert len(kept) == 5 and result["traces"] == 5
    task = __import__("leanseek.tasks", fromlist=["get_task"]).get_task("sums")
    for chat in kept:
        p = next(q for q in task.train_set(10, 1) if q.prompt == chat[0]["content"])
        assert chat[1] == {"role": "assistant", "content": p.answer, "reasoning_content": task.reasoning(p)}
    student, teacher = read_config(tmp_path / "d" / "latest"), read_config(base / "base" / "latest")
    assert student.hidden_size == 128 and student.vocab_size == teacher.vocab_size
    assert set(result) >= {"teacher", "student", "student/teacher"}
    assert json.loads((tmp_path / "d" / "distill.json").read_text())["traces"] == 5


def rl_args(base, out, *extra):
    import argparse

    from leanseek.rl import trainer

    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    return parser.parse_args(["--init", str(base / "base"), "--task", "sums", "--out", str(out), "--prompts", "2",
                              "--max-new-tokens", "6", "--eval-problems", "2", "--device", "cpu", "--threads", "1",
                              *extra])


def test_rl_refuses_group_1_and_sizes_the_cache_for_the_whole_pool(base, tmp_path, monkeypatch):
    """--group 1 is refused by name (a lone sample has no group advantage); the engine's context fits the longest
    prompt anywhere in the pool, here its last problem, made longer than every other."""
    import dataclasses

    from leanseek.data import TextTokenizer
    from leanseek.eval.tasks import prompt_ids
    from leanseek.rl import trainer
    from leanseek.tasks import get_task

    with pytest.raises(ValueError, match="--group 1: .*--group must be at least 2"):
        trainer.run(rl_args(base, tmp_path / "g1", "--group", "1"))

    sums = get_task("sums")

    class LongLast:
        def __getattr__(self, name):
            return getattr(sums, name)

        def train_set(self, n, seed=0):
            pool = sums.train_set(n, seed)
            return pool[:-1] + [dataclasses.replace(pool[-1], prompt=pool[-1].prompt + "+1" * 40)]

    sizes = []

    class Recording(trainer.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sizes.append(self.max_len)

    monkeypatch.setattr(trainer, "parse_mix", lambda spec: [(LongLast(), 1)])
    monkeypatch.setattr(trainer, "Engine", Recording)
    trainer.run(rl_args(base, tmp_path / "rl", "--group", "2", "--pool", "1200", "--steps", "0"))
    longest = prompt_ids(TextTokenizer.load(base / "base" / "latest"), LongLast().train_set(1200)[-1])
    assert sizes == [len(longest) + 6]


def test_rl_step_under_bf16_autocast(base, tmp_path):
    """--dtype bfloat16 (the default on GPUs): sampling, the micro-batched update (a budget that splits the
    batch) and the evaluation run under autocast, and the step's figures are finite."""
    import math

    from leanseek.rl import trainer

    line = trainer.run(rl_args(base, tmp_path / "rl", "--group", "2", "--pool", "50", "--steps", "1",
                               "--keep-zero-std", "--dtype", "bfloat16", "--micro-batch-tokens", "32"))
    assert all(math.isfinite(line[k]) for k in ("loss", "grad_norm", "entropy", "eval_pass@1"))
