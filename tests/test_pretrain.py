"""leanseek pretrain: exact resume after SIGKILL (whole and sharded checkpoints, the sharded run killed mid-save),
DDP and FSDP equivalence, the bias update, HF-loadable checkpoints and exports."""

import json
import os
import random
import shutil
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


def steady(data_dir, out, steps, *extra):
    """A schedule that does not depend on --steps, so that a 4-step run resumed to 6 is the 6-step run."""
    return command(data_dir, out, steps, "--warmup-steps", "2", "--decay-frac", "0", *extra)


def torchrun(cmd):
    """Run a `leanseek` command line on 2 CPU processes (gloo)."""
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + os.getpid() % 1000), "-m", "leanseek", *cmd[3:]], env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run(steady(data_dir, out, 6))
    return out


@pytest.fixture(scope="module")
def sharded(data_dir, tmp_path_factory):
    """2-process FSDP runs with fused AdamW: 6 steps straight; 4 steps (sharded checkpoints at 3 and 4) resumed to
    6; and a copy of the 4-step run, for resuming in one process."""
    base = tmp_path_factory.mktemp("sharded")
    fsdp = ("--fsdp", "--optimizer-impl", "fused")
    torchrun(steady(data_dir, base / "straight", 6, *fsdp))
    torchrun(steady(data_dir, base / "resumed", 4, *fsdp))
    shutil.copytree(base / "resumed", base / "one-process", symlinks=True)
    torchrun(steady(data_dir, base / "resumed", 6, *fsdp))
    return base


@pytest.mark.parametrize("mode", ["ddp", "fsdp-fused", "fsdp-foreach", "fsdp-for-loop"])
def test_two_processes_match_one_process(mode, data_dir, tmp_path, one_process, request):
    """torchrun on 2 CPU processes (gloo) with the same global batch: the same losses as one process, whether
    parameters are replicated (DDP) or sharded (FSDP2), with each of AdamW's implementations on sharded
    parameters (CUDA's default, foreach, used to fail on them). ddp and fsdp-foreach accumulate gradients over 2
    micro-batches (synchronising them on the last only)."""
    if mode == "fsdp-fused":
        two = request.getfixturevalue("sharded") / "straight"
    else:
        two = tmp_path / "two"
        options = ["--fsdp", "--optimizer-impl", mode[5:]] if mode.startswith("fsdp") else []
        accumulate = ["--micro-batch-size", "1"] if mode in ("ddp", "fsdp-foreach") else []
        torchrun(steady(data_dir, two, 6, *options, *accumulate))
    one, two = losses(one_process), losses(two)
    assert one.keys() == two.keys()
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5, abs=1e-5)


def test_sharded_checkpoint_resumes_exactly(sharded):
    """Each rank writes its own shards (nothing gathered on one), and resuming from them reproduces the
    uninterrupted run bit for bit."""
    latest = (sharded / "resumed" / "latest").resolve()
    assert latest.name == "step-000006" and not (latest / "model.safetensors").exists()
    files = {d: sorted(p.name for p in (latest / d).iterdir()) for d in ("model-shards", "optimizer-shards")}
    assert all(len(names) == 2 for names in files.values()), files  # one file per rank
    straight, resumed = losses(sharded / "straight"), losses(sharded / "resumed")
    assert {s: loss for s, (loss, _) in resumed.items()} == {s: loss for s, (loss, _) in straight.items()}
    assert [resumed[s][1] for s in (5, 6)] == [straight[s][1] for s in (5, 6)]  # validation losses too


def test_sharded_checkpoint_resumes_in_one_process(data_dir, sharded, one_process):
    """A checkpoint written by 2 processes resumes in 1 (the shards are cut to the new world size)."""
    run(steady(data_dir, sharded / "one-process", 6))
    one, resumed = losses(one_process), losses(sharded / "one-process")
    assert resumed.keys() == one.keys()
    for step in one:
        assert resumed[step][0] == pytest.approx(one[step][0], rel=1e-5, abs=1e-5)


def test_sharding_divides_the_training_state(sharded, one_process):
    """Parameters + gradients + optimizer state held per process, measured from the tensors after a step: with 2
    FSDP processes, about half of one process's."""
    def state_bytes(run_dir):
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["state_bytes_per_device"]

    assert state_bytes(sharded / "straight") <= 0.6 * state_bytes(one_process)


def test_sharded_run_exports_a_transformers_model(sharded, tmp_path, quiet):  # noqa: F811
    from transformers import AutoModelForCausalLM

    import leanseek
    from leanseek.cli import main

    main(["export", str(sharded / "straight"), "--out", str(tmp_path / "hf")])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # load_hf reads the shards whole in this one process, with no process group
        ours = leanseek.load_hf(sharded / "straight" / "latest")(ids)
        assert (theirs(ids).logits - ours).abs().max() < 1e-4
        assert torch.equal(leanseek.load_hf(tmp_path / "hf")(ids), ours)


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


def test_sharded_run_resumes_exactly_after_sigkill(data_dir, sharded, tmp_path):
    """Both ranks (and torchrun) killed with SIGKILL while saving sharded checkpoints every step: the same command
    again resumes from the newest complete checkpoint and reproduces the uninterrupted run bit for bit."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "leanseek",
           *steady(data_dir, out, 6, "--fsdp", "--optimizer-impl", "fused", "--save-every", "1")[3:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill in the middle of a save after the second step
        if len(list(out.glob("checkpoints/step-*"))) >= 2 and list(out.glob("checkpoints/.tmp-step-*/*")):
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: torchrun and both ranks
    proc.wait()
    assert len(list(out.glob("checkpoints/step-*"))) < 6  # killed before the end
    torchrun(steady(data_dir, out, 6, "--fsdp", "--optimizer-impl", "fused", "--save-every", "1"))
    straight, resumed = losses(sharded / "straight"), losses(out)
    assert resumed == straight


def test_sharded_bf16_gathers_in_bf16_and_matches_one_process(data_dir, tmp_path):
    """--fsdp --dtype bfloat16: FSDP's mixed precision (bf16 gathers, float32 reductions; no autocast copy of every
    weight held per rank) trains as one process under bf16 autocast does, to bf16's precision."""
    bf16 = ("--dtype", "bfloat16")
    run(steady(data_dir, tmp_path / "one", 4, *bf16))
    torchrun(steady(data_dir, tmp_path / "two", 4, "--fsdp", *bf16))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=2e-3)


def test_sharding_in_bf16_keeps_the_router_in_float32():
    """Under FSDP's mixed precision each block computes with bf16 copies of its weights, except the routers, whose
    own units gather in float32 (V3 report section 3.3)."""
    import torch.distributed as dist

    from conftest import small_config
    from leanseek.model.moe import Router
    from leanseek.model.transformer import Transformer
    from leanseek.train.loop import Objective, Place, shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{29700 + os.getpid() % 200}", rank=0,
                            world_size=1)
    try:
        model = Transformer(small_config(num_nextn_predict_layers=1)).train()
        objective = Objective(model, 0.3, 1e-4)
        shard(objective, Place(0, 1, torch.device("cpu"), True), bf16=True)
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, name=n: seen.setdefault(name, m.weight.dtype) and None)
                 for n, m in model.named_modules() if isinstance(m, Router)]
        hooks.append(model.layers[-1].self_attn.kv_a_proj_with_mqa.register_forward_pre_hook(
            lambda m, a: seen.setdefault("attention", m.weight.dtype) and None))
        objective(*[torch.randint(0, model.cfg.vocab_size, (2, 16))] * 2)[0].backward()
        for h in hooks:
            h.remove()
        routers = [dtype for name, dtype in seen.items() if name != "attention"]
        assert routers and all(d == torch.float32 for d in routers) and seen["attention"] == torch.bfloat16, seen
        assert all(p.grad.dtype == torch.float32 for p in objective.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()


DSA = ["index_n_heads=4", "index_head_dim=16", "index_topk=8"]  # sparse past 8 of the 32-token windows


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "latest" / "model.safetensors")


def test_sparse_attention_warm_up_then_sparse_training(data_dir, tmp_path):
    """DeepSeek-V3.2's two stages from a dense checkpoint (`--init`, indexers added by --set): the warm-up
    (`--train indexer`: dense attention, the indexers alone learn, their KL loss falls), then sparse training (every
    weight learns; the indexers from their loss only, the rest from the language-model loss)."""
    run(command(data_dir, tmp_path / "dense", 3))
    warm = command(data_dir, tmp_path / "warm", 12, *DSA, "--init", str(tmp_path / "dense"), "--train", "indexer",
                   "--lr", "0.01")
    run(warm)
    before, after = weights(tmp_path / "dense"), weights(tmp_path / "warm")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the dense model is untouched
    added = set(after) - set(before)
    assert added and all(".indexer." in k for k in added)
    lines = [json.loads(x) for x in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["index"] < 0.8 * lines[0]["index"]
    assert json.loads((tmp_path / "warm" / "cost.json").read_text())["flops"] > 0

    run(command(data_dir, tmp_path / "sparse", 3, *DSA, "--init", str(tmp_path / "warm")))
    trained = weights(tmp_path / "sparse")
    assert all(not torch.equal(trained[k], after[k]) for k in ("model.embed_tokens.weight",
                                                               "model.layers.0.self_attn.indexer.wk.weight"))
    assert "index" in json.loads((tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()[-1])

    wider = command(data_dir, tmp_path / "wider", 3, "kv_lora_rank=32", "--init", str(tmp_path / "dense"))
    done = subprocess.run(wider, capture_output=True, text=True)
    assert done.returncode == 2 and "would change shape or go" in done.stderr
    done = subprocess.run(command(data_dir, tmp_path / "no-indexer", 3, "--train", "indexer"), capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--train indexer: needs a sparse-attention model" in done.stderr


V4_MICRO = ["hidden_size=64", "moe_intermediate_size=16", "num_attention_heads=2", "head_dim=16", "qk_rope_head_dim=8",
            "q_lora_rank=32", "o_groups=2", "o_lora_rank=16", "sliding_window=8", "n_routed_experts=8",
            "num_experts_per_tok=2", "hc_mult=2", "index_n_heads=2", "index_head_dim=16", "index_topk=2",
            'compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}']


def test_v4_pretrains_resumes_exactly_and_counts_its_flops(data_dir, tmp_path):
    """A DeepSeek-V4 model (`--preset tiny-v4`, shrunk: a sliding-window, a CSA and an HCA layer at 32 tokens, hash
    routing first) trains on the corpus: a run resumed from its step-3 checkpoint reproduces the straight run bit for
    bit, the CSA indexer's loss is logged, and the cost ledger counts V4's FLOPs (its compressed branches and
    indexer included)."""
    import leanseek

    def v4(out, steps):
        cmd = command(data_dir, out, steps)
        return cmd[: cmd.index("--set")] + ["--warmup-steps", "2", "--decay-frac", "0", "--preset", "tiny-v4",
                                            "--set", "num_hidden_layers=3", 'layer_types=["sliding_attention", '
                                            '"compressed_sparse_attention", "heavily_compressed_attention"]',
                                            'mlp_layer_types=["hash_moe", "moe", "moe"]', *V4_MICRO]

    run(v4(tmp_path / "straight", 6))
    run(v4(tmp_path / "resumed", 3))
    run(v4(tmp_path / "resumed", 6))
    # (the 3-step run also validated at its last step)
    assert ({s: loss for s, (loss, _) in losses(tmp_path / "resumed").items()}
            == {s: loss for s, (loss, _) in losses(tmp_path / "straight").items()})
    assert weights(tmp_path / "resumed").keys() == weights(tmp_path / "straight").keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "resumed").values(),
                                                  weights(tmp_path / "straight").values()))
    line = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["index"] > 0
    cfg = leanseek.load_hf(tmp_path / "straight" / "latest").cfg
    assert cfg.v4 and cfg.layer_types[1] == "compressed_sparse_attention"
    cost = json.loads((tmp_path / "straight" / "cost.json").read_text())
    assert cost["flops"] == pytest.approx(cfg.flops_per_token(32) * 6 * 4 * 32)
    # the ledger's attention term: 2 heads x (window 8 + 8 entries picked of 8 at 32 tokens / 4) x 2 x 16, plus the
    # indexer's 2 heads x 16 over the 8 CSA entries, plus HCA's window 8 + 4 entries; and the MTP's sliding window
    sliding, csa, hca = (cfg._v4_attention_flops(t, 32) for t in cfg.layer_types)
    assert (sliding, csa, hca) == (6 * 2 * 32 * 8, 6 * 2 * 32 * (8 + 2) + 6 * 2 * 16 * 8, 6 * 2 * 32 * (8 + 4))
