"""leanseek pretrain: exact resume after SIGKILL, DDP equivalence, the bias update, HF-loadable checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import quiet  # noqa: F401

from leanseek.data import collect, train_tokenizer, write_shards

MICRO = ["hidden_size=64", "intermediate_size=96", "moe_intermediate_size=16", "num_hidden_layers=2",
         "num_attention_heads=2", "q_lora_rank=32", "kv_lora_rank=16", "qk_nope_head_dim=8", "qk_rope_head_dim=8",
         "v_head_dim=8", "n_routed_experts=8", "num_experts_per_tok=2", "n_group=2", "topk_group=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    docs, stats = collect(["builtin:python-topics"])
    tokenizer = train_tokenizer(iter(docs), 512)
    tokenizer.save(out)
    write_shards(docs, tokenizer, out, stats, val_fraction=0.05)
    return out


def command(data_dir, out, steps, *extra):
    return [sys.executable, "-m", "leanseek", "pretrain", "--data", str(data_dir), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--save-every", "3", "--eval-every", "5",
            "--eval-tokens", "256", "--peak-tflops", "1", "--threads", "1", "--set", *MICRO, *extra]


def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: (x["loss"], x.get("val_loss")) for x in lines if x["step"] > 0}


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_resume_after_sigkill_reproduces_the_run(data_dir, tmp_path):
    steps = 24
    run(command(data_dir, tmp_path / "straight", steps))
    want = losses(tmp_path / "straight")
    assert len(want) == steps
    rng = random.Random(0)
    killed = tmp_path / "killed"
    for kill_after in (4, 11, 17):  # wait for that many logged steps, then kill at a random moment after it
        proc = subprocess.Popen(command(data_dir, killed, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        metrics = killed / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) > kill_after:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # and once in the middle of writing a checkpoint (saving every step, which changes no loss, to be sure to hit one)
    proc = subprocess.Popen(command(data_dir, killed, steps, "--save-every", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list((killed / "checkpoints").glob(".tmp-step-*/*")):
        pass
    proc.send_signal(signal.SIGKILL)
    caught_in_save = proc.wait() == -signal.SIGKILL
    run(command(data_dir, killed, steps))
    assert caught_in_save
    assert losses(killed) == want  # bit for bit: losses and validation losses of every step
    assert (killed / "latest").resolve().name == f"step-{steps:06d}"
    assert len(list((killed / "checkpoints").glob("step-*"))) == 3 and not list(killed.glob("checkpoints/.tmp-*"))
    cost = json.loads((killed / "cost.json").read_text())
    assert cost["tokens"] >= steps * 4 * 32 and cost["device_hours"] > 0


def test_changed_settings_are_refused_and_tensorboard_logs(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(command(data_dir, tmp_path / "r", 3, "--tensorboard"))
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard")).Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx({step: loss for step, (loss, _) in losses(tmp_path / "r").items()})
    done = subprocess.run(command(data_dir, tmp_path / "r", 6, "--lr", "0.01", "--tensorboard"), capture_output=True,
                          text=True)
    assert done.returncode == 2 and "changed: lr 0.002 -> 0.01" in done.stderr
    done = subprocess.run(command(data_dir, tmp_path / "q", 3, "--micro-batch-size", "3"), capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--batch-size 4 must be a multiple" in done.stderr


def test_checkpoint_is_a_transformers_model(data_dir, tmp_path, quiet):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import leanseek

    run(command(data_dir, tmp_path / "r", 3))
    latest = tmp_path / "r" / "latest"
    theirs = AutoModelForCausalLM.from_pretrained(latest, attn_implementation="eager", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(latest)
    ids = torch.tensor([tok.encode("for x in range(10): print(x)", add_special_tokens=False)])
    with torch.no_grad():
        assert (theirs(ids).logits - leanseek.load_hf(latest)(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(mode, data_dir, tmp_path):
    """torchrun on 2 CPU processes (gloo) with the same global batch: the same losses as one process, whether
    parameters are replicated (DDP) or sharded (FSDP2); the sharded run's checkpoint resumes."""
    # a schedule that does not depend on --steps, so that a 4-step run resumed to 6 is the 6-step run
    single = command(data_dir, tmp_path / "one", 6, "--warmup-steps", "2", "--decay-frac", "0")
    run(single)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "leanseek", *single[3:], *(["--fsdp"] if mode == "fsdp" else [])]
    ddp[ddp.index(str(tmp_path / "one"))] = str(tmp_path / "two")
    ddp[ddp.index("6")] = "4"
    run(ddp, env={**os.environ, "OMP_NUM_THREADS": "1"})  # 4 steps, a checkpoint at 3 ...
    ddp[ddp.index("4")] = "6"
    run(ddp, env={**os.environ, "OMP_NUM_THREADS": "1"})  # ... then resumed from step 4 to 6
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5, abs=1e-5)


def test_bias_update_lowers_maxvio(data_dir, tmp_path):
    """Without the bias update the routers collapse onto a few experts; with it (and no auxiliary loss at all)
    the expert load of the last steps is far more even."""
    def mean_maxvio(gamma, out):  # MTP off too: the update then covers the main layers' routers only
        run(command(data_dir, out, 60, "--bias-update-speed", str(gamma), "--balance-weight", "0",
                    "--mtp-weight", "0"))
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-10:]
        return sum(x["maxvio"] for x in lines) / len(lines)

    assert mean_maxvio(0.003, tmp_path / "balanced") < 0.75 * mean_maxvio(0.0, tmp_path / "free")


def test_batches_do_not_depend_on_world_size_or_accumulation():
    import numpy as np

    from leanseek.train.loader import WindowSampler

    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)  # 10 windows of 8 + 1 tokens
    sampler = WindowSampler(tokens, seq_len=8, batch_size=4, seed=3)
    full = torch.cat([x for x, _ in sampler.micro_batches(2, rank=0, world=1, accumulation=1)])
    split = torch.cat([x for r in range(2) for x, _ in sampler.micro_batches(2, rank=r, world=2, accumulation=2)])
    assert torch.equal(full, split)
    x, y = sampler.micro_batches(0, 0, 1, 1)[0]
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next tokens
    # 3 steps of 4 cover 12 windows: the first epoch's 10, then the second epoch's order begins
    seen = [int(w) for step in range(3) for w in sampler.global_batch(step)]
    assert sorted(seen[:10]) == list(range(10)) and seen[:10] != list(range(10))
    assert WindowSampler(tokens, 8, 4, seed=3).global_batch(7).tolist() == sampler.global_batch(7).tolist()


def test_learning_rate_schedule():
    from types import SimpleNamespace

    from leanseek.train.loop import lr_at

    args = SimpleNamespace(lr=1.0, steps=100, warmup_steps=10, decay_frac=0.2)
    lrs = [lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_compiled_training_matches_eager(data_dir, tmp_path):
    run(command(data_dir, tmp_path / "eager", 3))
    run(command(data_dir, tmp_path / "compiled", 3, "--compile"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [compiled[s][0] for s in compiled] == pytest.approx([eager[s][0] for s in eager], rel=1e-4)
