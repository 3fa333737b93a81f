"""`leanseek speedrun --preset micro`: every stage's output, every section of the report with the run's own
figures, stages skipped when complete and redone when their output is missing, each stage called with what its
command parses to, dry runs (in their own folder, at the preset's shapes), and the presets' plans."""

import json
import re
import shlex

import pytest
import torch

from leanseek.cli import main, parser
from leanseek.data.instructions import GREETINGS
from leanseek.data.builtin import BUILTINS
from leanseek.eval.report import SECTIONS
from leanseek.model.config import ModelConfig
from leanseek.speedrun import SPEEDRUNS, Stage, dry_run, stages


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "runs"
    main(["speedrun", "--preset", "micro", "--out", str(out)])
    return out


def test_every_stage_output_is_complete(micro):
    plan = stages(SPEEDRUNS["micro"], micro)
    assert [s.name for s in plan] == ["data", "pretrain", "sft data", "sft", "mtp", "eval sft", "rl", "eval rl",
                                      "probes"]
    assert all(s.done() for s in plan)
    manifest = json.loads((micro / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 0 and (micro / "data" / "tokenizer.json").is_file()
    for run, steps in (("pretrain", 30), ("sft", 20), ("mtp", 4), ("rl", 3)):
        state = json.loads((micro / run / "latest" / "trainer_state.json").read_text())
        assert state["step"] == steps
        assert (micro / run / "latest" / "model.safetensors").is_file()
        assert json.loads((micro / run / "cost.json").read_text())["flops"] > 0
    # SFT leaves the MTP loss out; the mtp stage fits the module alone; GRPO starts from that
    assert json.loads((micro / "sft" / "latest" / "trainer_state.json").read_text())["args"]["mtp_weight"] == 0
    assert json.loads((micro / "mtp" / "latest" / "trainer_state.json").read_text())["args"]["train"] == "mtp"
    assert json.loads((micro / "rl" / "latest" / "trainer_state.json").read_text())["args"]["init"] == \
        str(micro / "mtp")
    chats = [json.loads(line)["messages"] for line in (micro / "sft.jsonl").read_text().splitlines()]
    greetings = {q.lower().rstrip("!?") for q in GREETINGS}
    assert any(c[1].get("reasoning_content") for c in chats)
    assert any(c[0]["content"].lower().rstrip("!?") in greetings for c in chats)
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in chats)
    for name in ("eval-sft.json", "eval-rl.json"):
        ev = json.loads((micro / name).read_text())
        assert ev["metrics"]["all"]["n"] == 24 and "pass@2" in ev["metrics"]["all"] and ev["tokens"] > 0
    probes = json.loads((micro / "probes.json").read_text())
    assert probes["samples"] and all("content" in s for s in probes["samples"])
    assert 0 <= probes["mtp_acceptance"]["sft"]["rate"] <= 1 and probes["mtp_acceptance"]["sft"]["drafted"] > 0
    share = probes["experts"]["rl"]["share"]
    assert len(share) == 3 and all(abs(sum(layer) - 1) < 1e-5 for layer in share)  # nano: 3 MoE layers
    assert probes["kv_cache"]["mla_bytes_per_token"] < probes["kv_cache"]["mha_bytes_per_token"]
    timings = json.loads((micro / "timings.json").read_text())
    assert list(timings) == [s.name for s in plan] and all(t["seconds"] > 0 for t in timings.values())
    assert all("commit" in t for t in timings.values())


def test_report_has_every_section_with_the_runs_figures(micro):
    report = (micro / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", report, re.M)
    assert headings == SECTIONS
    for png in ("cost", "pretrain", "rl", "experts"):
        assert f"(plots/{png}.png)" in report
        assert (micro / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # figures come from the run's files
    sft, rl = (json.loads((micro / f"eval-{s}.json").read_text())["metrics"]["all"] for s in ("sft", "rl"))
    assert f"| pass@1 (greedy) | {sft['pass@1']:.1%} | {rl['pass@1']:.1%} |" in report
    assert f"| mean length | {sft['length']:.1f} tokens | {rl['length']:.1f} tokens |" in report
    probes = json.loads((micro / "probes.json").read_text())
    kv = probes["kv_cache"]
    assert f"| bytes per token | {kv['mla_bytes_per_token']:,} | {kv['mha_bytes_per_token']:,} |" in report
    assert f"{probes['mtp_acceptance']['rl']['rate']:.1%}" in report
    assert probes["samples"][0]["content"] in report
    tools = probes["tools"]
    assert bool(tools) == BUILTINS["wordnet"].available()  # None without WordNet (Debian's wordnet-base)
    if tools:
        with_tool = [tools[s]["with tool"]["f1"] for s in ("sft", "rl")]
        assert f"| definition F1 with the tool | {with_tool[0]:.2f} | {with_tool[1]:.2f} |" in report
    pretrain = [json.loads(line) for line in (micro / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert f"| after 30 steps | {pretrain[-1]['val_bpb']:.3f} |" in report
    cfg = json.loads((micro / "rl" / "latest" / "config.json").read_text())
    assert f"hidden {cfg['hidden_size']}" in report
    total = re.search(r"\| \*\*total\*\* \| \*\*([\d.]+ (s|min))\*\* \|", report).group(1)
    assert f"This run took {total} " in report.split("\n## ")[0]  # the opening states the time measured
    assert f"({torch.backends.cpu.get_cpu_capability()} kernels)" in report  # AVX2 or AVX-512: same model name
    assert "DeepSeek-V3 pre-training (14.8T tokens)" in report and "| pre-training | 2,664K |" in report
    assert "leanseek pretrain --data" in report and "stages ran at commit" in report
    assert f"`leanseek speedrun --preset micro --out {micro}`" in report


def test_a_second_run_skips_complete_stages_and_redoes_missing_ones(micro, capsys):
    checkpoints = sorted(p.name for p in (micro / "rl" / "checkpoints").iterdir())
    pretrain_time = json.loads((micro / "timings.json").read_text())["pretrain"]["seconds"]
    (micro / "eval-rl.json").unlink()
    (micro / "report.md").unlink()
    capsys.readouterr()
    main(["speedrun", "--preset", "micro", "--out", str(micro)])
    printed = capsys.readouterr().out
    for name in ("data", "pretrain", "sft data", "sft", "mtp", "eval sft", "rl", "probes"):
        assert f"{name}: complete, skipped" in printed
    assert "] eval rl: leanseek eval" in printed and (micro / "eval-rl.json").is_file()
    assert (micro / "report.md").is_file() and "leanseek chat" in printed and "leanseek serve" in printed
    assert sorted(p.name for p in (micro / "rl" / "checkpoints").iterdir()) == checkpoints
    assert json.loads((micro / "timings.json").read_text())["pretrain"]["seconds"] == pretrain_time


def test_a_run_folder_continues_only_with_its_own_settings(micro, capsys):
    for other in (["--preset", "cpu"], ["--preset", "micro", "--source", "builtin"]):
        with pytest.raises(SystemExit, match="2"):
            main(["speedrun", *other, "--out", str(micro)])
        assert "holds a speedrun with other settings" in capsys.readouterr().err


def test_a_dry_run_checks_every_stage_in_its_own_folder(micro, capsys):
    """--dry-run: every stage for two steps at the preset's model, vocabulary and sequence lengths, in
    RUNS_DIR/dry-run, leaving the run in RUNS_DIR untouched; each stage's time printed."""
    real = {p: p.stat().st_mtime_ns for p in micro.rglob("*") if p.is_file()}
    capsys.readouterr()
    main(["speedrun", "--preset", "micro", "--dry-run", "--out", str(micro)])
    printed = capsys.readouterr().out
    dry = micro / "dry-run"
    assert {p: p.stat().st_mtime_ns for p in real} == real
    preset = SPEEDRUNS["micro"]
    plan = stages(dry_run(preset, 1, "cpu"), dry)
    assert all(s.done() for s in plan)
    for run, seq_len in (("pretrain", 128), ("sft", 128), ("rl", None)):
        state = json.loads((dry / run / "latest" / "trainer_state.json").read_text())
        assert state["step"] == state["args"]["steps"] == 2
        if seq_len:
            assert state["args"]["seq_len"] == seq_len and state["args"]["batch_size"] == 2
    cfg = json.loads((dry / "rl" / "latest" / "config.json").read_text())
    nano = ModelConfig.preset(preset["model"])
    assert cfg["vocab_size"] == preset["data"]["vocab_size"] and cfg["hidden_size"] == nano.hidden_size
    assert json.loads((dry / "eval-rl.json").read_text())["metrics"]["all"]["n"] == 4
    timings = json.loads((dry / "timings.json").read_text())
    assert list(timings) == [s.name for s in plan]
    for name, t in timings.items():
        assert f"] {name}: done in {t['seconds']:.1f} s" in printed
        assert re.search(rf"^{name} +{t['seconds']:.1f}$", printed, re.M)
    assert "dry run of speedrun micro passed" in printed
    assert f"`leanseek speedrun --preset micro --dry-run --out {micro}`" in (dry / "report.md").read_text()


def test_a_dry_runs_corpus_is_the_first_characters_of_each_source():
    """`leanseek data --max-mb-per-source`: each source read up to the document that reaches the limit."""
    from leanseek.data import collect

    whole, _ = collect(["builtin:python-topics"])
    docs, stats = collect(["builtin:python-topics", "builtin:python-topics"], max_chars=20_000)
    n = stats[0].documents
    assert [s.documents for s in stats] == [n, n] and docs == whole[:n] * 2
    assert sum(map(len, whole[:n - 1])) < 20_000 <= sum(map(len, whole[:n])) == stats[0].chars


def test_a_dry_run_empties_only_a_dry_runs_folder(tmp_path, capsys):
    (tmp_path / "dry-run").mkdir()
    (tmp_path / "dry-run" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="2"):
        main(["speedrun", "--preset", "micro", "--dry-run", "--out", str(tmp_path)])
    assert "is not a dry run's folder" in capsys.readouterr().err
    assert (tmp_path / "dry-run" / "notes.txt").read_text() == "mine"


def test_a_multi_device_stage_runs_its_command_under_torchrun(micro, tmp_path):
    """gpu-8's dry run on a CPU in small: pretraining in 2 processes under torchrun with FSDP and gradient
    accumulation, launched as the command the report shows."""
    preset = {**SPEEDRUNS["micro"], "devices": 8,
              "pretrain": {**SPEEDRUNS["micro"]["pretrain"], "micro_batch_size": 4, "fsdp": True}}
    (tmp_path / "data").symlink_to(micro / "data")
    stage = stages(dry_run(preset, 2, "cpu"), tmp_path)[1]
    assert stage.command().startswith("torchrun --nproc_per_node=2 -m leanseek pretrain ")
    stage.run()
    state = json.loads((tmp_path / "pretrain" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert {k: state["args"][k] for k in ("batch_size", "micro_batch_size", "fsdp")} == \
        {"batch_size": 4, "micro_batch_size": 1, "fsdp": True}


@pytest.mark.parametrize("name", list(SPEEDRUNS))
def test_each_stage_runs_with_what_its_shown_command_parses_to(name, tmp_path):
    """A stage calls its subcommand's run() with the arguments `leanseek` would parse from the command the plan,
    timings.json and report.md show, for every preset and its dry run."""
    for preset in (SPEEDRUNS[name], dry_run(SPEEDRUNS[name], min(SPEEDRUNS[name]["devices"], 2), "cpu")):
        plan = stages(preset, tmp_path / "my runs", ["builtin", "my notes/"], threads=2)
        mtp = ["sft"] if "mtp" in preset else []  # the MTP module fitted alone after SFT without its loss
        assert [s.subcommand for s in plan] == ["data", "pretrain", None, "sft", *mtp, "eval", "rl", "eval", None]
        for stage in plan:
            if stage.subcommand:
                argv = shlex.split(stage.command())
                assert vars(stage.namespace()) == vars(parser().parse_args(argv[argv.index("leanseek") + 1:]))


def test_an_option_its_subcommand_lacks_is_named(tmp_path):
    stage = Stage("pretrain", tmp_path, "pretrain", ["--data", "d", "--out", "o"], {"batch_sise": 4})
    with pytest.raises(ValueError, match="leanseek pretrain has no option --batch-sise"):
        stage.namespace()


@pytest.mark.parametrize("preset,processes", [("gpu-1", 1), ("gpu-8", 2)])
def test_a_gpu_presets_dry_run_keeps_its_shapes(preset, processes, capsys, tmp_path):
    """On a CPU, gpu-8's dry run trains in 2 processes under torchrun, with FSDP as the real run, and both train
    in bf16 autocast as on GPUs."""
    main(["speedrun", "--preset", preset, "--dry-run", "--plan", "--out", str(tmp_path / "r")])
    printed = capsys.readouterr().out
    real = SPEEDRUNS[preset]
    pretrain = next(line for line in printed.splitlines() if " pretrain --data" in line)
    assert f"--preset {real['model']} " in pretrain and f"--set vocab_size={real['data']['vocab_size']}" in pretrain
    assert f"--seq-len {real['pretrain']['seq_len']} " in pretrain and "--steps 2 " in pretrain
    assert pretrain.strip().startswith(f"torchrun --nproc_per_node={processes}" if processes > 1 else "leanseek")
    assert ("--fsdp" in pretrain) == real["pretrain"].get("fsdp", False)
    assert "--dtype bfloat16" in pretrain  # autocast, as on the preset's GPUs
    assert f"{tmp_path / 'r' / 'dry-run'}/pretrain" in pretrain
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_gpu_1_dry_run_passes_on_a_cpu(tmp_path, capsys):
    main(["speedrun", "--preset", "gpu-1", "--dry-run", "--out", str(tmp_path)])
    assert "dry run of speedrun gpu-1 passed" in capsys.readouterr().out
    dry = tmp_path / "dry-run"
    small = ModelConfig.preset("small")
    cfg = json.loads((dry / "rl" / "latest" / "config.json").read_text())
    assert cfg["vocab_size"] == 32768
    assert all(cfg[k] == getattr(small, k) for k in ("hidden_size", "num_hidden_layers", "kv_lora_rank",
                                                     "qk_rope_head_dim", "n_routed_experts"))
    state = json.loads((dry / "pretrain" / "latest" / "trainer_state.json").read_text())
    assert state["args"]["seq_len"] == 1024 and state["step"] == 2


def test_an_unfinished_training_stage_is_not_complete(tmp_path):
    stage = Stage("pretrain", tmp_path / "pretrain", "pretrain")
    assert not stage.done()
    step = tmp_path / "pretrain" / "checkpoints" / "step-000010"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 10, "args": {"steps": 20}}))
    assert not stage.done()
    (step / "trainer_state.json").write_text(json.dumps({"step": 20, "args": {"steps": 20}}))
    assert stage.done()


@pytest.mark.parametrize("preset,devices", [("gpu-1", 1), ("gpu-8", 8)])
def test_gpu_presets_state_their_expected_time_and_cost(preset, devices, capsys, tmp_path):
    main(["speedrun", "--preset", preset, "--out", str(tmp_path / "r"), "--plan"])
    printed = capsys.readouterr().out
    m = re.search(r"expected: ([\d.]+) (min|h) on (\d) x H100 at 25% MFU .*, ([\d.]+) device-hours, \$(\d+)", printed)
    assert m and int(m.group(3)) == devices
    hours = float(m.group(1)) / (60 if m.group(2) == "min" else 1)
    assert 0.1 < hours < 3 and float(m.group(4)) == pytest.approx(hours * devices, rel=0.1)
    assert ("torchrun --nproc_per_node=8" in printed) == (devices == 8)
    assert not (tmp_path / "r").exists()  # a plan runs nothing


def test_the_assistant_runs_in_transformers_as_in_leanseek(micro):
    """The final checkpoint handed to transformers (the README's snippet): its chat template, its generation
    config (which stops at the end of the turn) and greedy generate give leanseek's engine's reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanseek.eval.probes import reply
    from leanseek.infer.engine import Engine
    from leanseek.model.hf import load_hf
    from leanseek.data.tokenizer import TextTokenizer

    path = micro / "rl" / "latest"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "12+34+56"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    theirs = tok.decode(out)
    ours = reply(Engine(load_hf(path), TextTokenizer.load(path), max_batch=1, max_len=256), TextTokenizer.load(path),
                 ["12+34+56"], 40)[0]
    thought = "<think>" + (ours["reasoning"] or "")
    assert theirs.startswith(thought)
    rest = theirs[len(thought):]  # the think block closed and the answer, unless the reply ran out of tokens in it
    assert rest.startswith("</think>" + ours["content"]) or not (ours["content"] or "</think>" in rest)
    if len(out) < 40:  # it stopped: at the end of the turn
        assert theirs.endswith("<|end|>")


def test_examples_show_the_spread_of_scores():
    from leanseek.eval.probes import quantile_picks

    assert quantile_picks([0.1, 0.9, 0.5, 0.3, 0.7]) == [1, 4, 2, 3, 0]  # best, upper quartile, median, ..., worst
    assert quantile_picks([0.5]) == [0]


def test_the_report_gives_the_command_that_continues_the_run(tmp_path):
    from leanseek.eval.report import speedrun_command

    (tmp_path / "speedrun.json").write_text(json.dumps({"preset": "cpu", "source": ["builtin", "my notes/"],
                                                        "chats": ["chats.jsonl"]}))
    assert speedrun_command(tmp_path, "cpu") == ("leanseek speedrun --preset cpu --source builtin 'my notes/' "
                                                 f"--chats chats.jsonl --out {tmp_path}")
