"""The speedrun's report card: RUNS_DIR/report.md and its plots, made only from what the run wrote (metrics,
ledgers, evaluations, probes, stage timings), so every figure in it was measured by that run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..atomic import write_atomic, write_text_atomic
from ..device import cpu_name
from ..model.config import ModelConfig, human
from ..tasks import parse_mix
from ..train.checkpoint import checkpoint_of
from ..train.cost import DEEPSEEK_V3, DEEPSEEK_V3_GPU_HOURS, PEAK_TFLOPS

SECTIONS = ["Environment", "Model", "Tokens", "Cost", "Pretraining", "Reasoning task", "Definitions", "Tool use",
            "Expert load", "MTP", "KV cache", "Sample conversations", "Reproduce"]


def md_table(header: list[str], rows: list[list]) -> str:
    def cells(row):
        return "| " + " | ".join(str(c) for c in row) + " |"

    return "\n".join([cells(header), "|" + "|".join("---" for _ in header) + "|", *map(cells, rows)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def si(x: float) -> str:
    return f"{x:.3g}" if x < 1e3 else f"{x:.2e}"


def money(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:.2g}" if x >= 0.01 else f"${x:.2e}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def git_commit() -> str:
    """The leanseek checkout's commit, marked when tracked files have changed since; "" outside a git checkout."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD")[:12]
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return commit


def environment(timings: dict) -> list[list[str]]:
    """Where and with what the run ran, and the leanseek commit(s) its stages ran at."""
    commit = git_commit()
    ran = sorted({t["commit"] for t in timings.values() if t.get("commit")})
    cpu = cpu_name()
    from .. import __version__

    rows = [["date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")],
            ["leanseek", f"{__version__}; stages ran at commit {', '.join(ran) or 'unknown'}; this report was "
                         f"written at commit {commit or 'unknown (not a git checkout)'}"],
            ["CPU", f"{cpu} ({torch.backends.cpu.get_cpu_capability()} kernels), {os.cpu_count()} cores visible, "
                    f"torch uses {torch.get_num_threads()} threads"],
            ["GPU", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"],
            ["software", f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}"]]
    return rows


class Run:
    """The files a speedrun wrote."""

    def __init__(self, out: Path):
        self.out = out
        self.timings = read_json(out / "timings.json") or {}
        self.manifest = read_json(out / "data" / "manifest.json")
        self.metrics = {s: read_jsonl(out / s / "metrics.jsonl") for s in ("pretrain", "sft", "mtp", "rl")}
        self.ledgers = {s: read_json(out / s / "cost.json") for s in ("pretrain", "sft", "mtp", "rl")}
        self.evals = {s: read_json(out / f"eval-{s}.json") for s in ("sft", "rl")}
        self.probes = read_json(out / "probes.json")
        self.ledger = next((v for v in self.ledgers.values() if v), {})  # the price and peak of this machine
        self.cfg = ModelConfig.from_hf(json.loads((checkpoint_of(out / "rl") / "config.json").read_text()))

    def seconds(self, stage: str) -> float:
        return self.timings.get(stage, {}).get("seconds", 0.0)


def write_report(out: Path, name: str, preset: dict, plan) -> Path:
    run = Run(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    about = preset["about"][0].upper() + preset["about"][1:]
    took = duration(sum(r["seconds"] for r in stage_costs(run, preset)))
    parts = [f"# leanseek speedrun `{name}`: report card\n\n{about}. This run took {took} (machine below). "
             "Every figure below was measured by this run, from the files in this folder.\n"]
    parts.append("## Environment\n\n" + md_table(["", ""], environment(run.timings)))
    parts.append(model_section(run, preset))
    parts.append(tokens_section(run))
    parts.append(cost_section(run, preset, plots))
    parts.append(pretraining_section(run, plots))
    parts.append(task_section(run, preset, plots))
    parts.append(definitions_section(run))
    parts.append(tools_section(run))
    parts.append(experts_section(run, plots))
    parts.append(mtp_section(run))
    parts.append(kv_section(run))
    parts.append(samples_section(run))
    parts.append("## Reproduce\n\nEach stage is one command (the speedrun skips those already complete):\n\n```\n"
                 + "\n".join(s.command() or f"# {s.name}: written by the speedrun itself" for s in plan)
                 + f"\n```\n\nor all of them: `{speedrun_command(out, name)}`.")
    path = out / "report.md"
    write_text_atomic(path, "\n\n".join(parts) + "\n")
    return path


def speedrun_command(out: Path, name: str) -> str:
    """The command that made (and continues) this run, its --source and --chats included."""
    import shlex

    settings = read_json(out / "speedrun.json") or {}
    extra = [x for key in ("source", "chats") if settings.get(key) for x in (f"--{key}", *settings[key])]
    if settings.get("dry_run"):  # a dry run's folder is RUNS_DIR/dry-run
        extra, out = [*extra, "--dry-run"], out.parent
    return shlex.join(["leanseek", "speedrun", "--preset", name, *extra, "--out", str(out)])


def model_section(run: Run, preset: dict) -> str:
    cfg, pc = run.cfg, run.cfg.param_counts()
    rows = [["preset", preset["model"]],
            ["parameters", f"{pc.total:,} total ({human(pc.total)}), {pc.active:,} active per token "
                           f"({human(pc.active)}, {pc.active / pc.total:.0%}); MTP module {human(pc.mtp)}"],
            ["layers", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense, "
                       f"{cfg.num_hidden_layers - cfg.first_k_dense_replace} MoE), hidden {cfg.hidden_size}, "
                       f"{cfg.num_attention_heads} heads, vocabulary {cfg.vocab_size:,}"],
            ["attention (MLA)", f"q rank {cfg.q_lora_rank}, kv rank {cfg.kv_lora_rank}, head dims "
                                f"{cfg.qk_nope_head_dim} + {cfg.qk_rope_head_dim} (RoPE), v {cfg.v_head_dim}"],
            ["experts", f"{cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared, {cfg.num_experts_per_tok} "
                        f"per token within the best {cfg.topk_group} of {cfg.n_group} groups, "
                        f"{cfg.scoring_func} gates, auxiliary-loss-free bias"],
            ["multi-token prediction", f"{cfg.num_nextn_predict_layers} module"]]
    return "## Model\n\n" + md_table(["", ""], rows)


def tokens_section(run: Run) -> str:
    rows = []
    if run.manifest:
        for split, s in run.manifest["splits"].items():
            rows.append([f"corpus, {split}", f"{s['tokens']:,}", f"{s['documents']:,} documents, "
                                                                 f"{s['bytes'] / max(s['tokens'], 1):.2f} bytes/token"])
    for stage, what in (("pretrain", "tokens trained on"), ("sft", "tokens trained on (loss on the assistant's)"),
                        ("mtp", "tokens the MTP module alone trained on (the model frozen)"),
                        ("rl", "completion tokens trained on")):
        if run.ledgers[stage]:
            rows.append([stage, f"{run.ledgers[stage]['tokens']:,}", what])
    for stage in ("sft", "rl"):
        if run.evals[stage]:
            rows.append([f"eval {stage}", f"{run.evals[stage]['tokens']:,}", "prompt + generated tokens"])
    if run.manifest and run.ledgers["pretrain"]:
        epochs = run.ledgers["pretrain"]["tokens"] / run.manifest["splits"]["train"]["tokens"]
        rows.append(["", "", f"pretraining saw {epochs:.2f} epochs of the corpus"])
    return "## Tokens\n\n" + md_table(["stage", "tokens", ""], rows)


def stage_costs(run: Run, preset: dict) -> list[dict]:
    """Per stage: wall seconds (the whole stage, start-up and evaluations included), FLOPs, device-hours,
    MFU over the wall time, dollars."""
    price = run.ledger.get("price_per_device_hour", 0.0)
    peak = run.ledger.get("peak_tflops", 0.0)
    counted = {**run.ledgers, "eval sft": run.evals["sft"], "eval rl": run.evals["rl"], "probes": run.probes}
    rows = []
    for stage in run.timings:
        devices = preset["devices"] if stage in ("pretrain", "sft") else 1
        ledger_seconds = (run.ledgers.get(stage) or {}).get("wall_seconds", 0.0)
        seconds = max(run.seconds(stage), ledger_seconds)  # a resumed stage's ledger holds its earlier steps too
        f = (counted.get(stage) or {}).get("flops", 0.0)
        # a rented multi-GPU machine is paid for by the hour whatever runs: every stage costs all its devices
        hours = seconds * preset["devices"] / 3600
        rows.append({"stage": stage, "seconds": seconds, "flops": f, "device_hours": hours,
                     "mfu": f / max(seconds * devices * peak * 1e12, 1e-9), "dollars": hours * price})
    return rows


def cost_section(run: Run, preset: dict, plots: Path) -> str:
    rows = stage_costs(run, preset)
    total = {k: sum(r[k] for r in rows) for k in ("seconds", "flops", "device_hours", "dollars")}
    peak = run.ledger.get("peak_tflops", 0.0)
    total["mfu"] = total["flops"] / max(total["seconds"] * peak * 1e12, 1e-9)
    device = "GPU" if preset["device"] != "cpu" else "CPU"
    table = md_table(["stage", "wall time", f"{device}-hours", "FLOPs", "MFU", "cost"],
                     [[r["stage"], duration(r["seconds"]), f"{r['device_hours']:.4f}",
                       si(r["flops"]) if r["flops"] else "-", f"{r['mfu']:.1%}" if r["flops"] else "-",
                       money(r["dollars"])] for r in rows]
                     + [["**total**", f"**{duration(total['seconds'])}**", f"**{total['device_hours']:.4f}**",
                         f"**{si(total['flops'])}**", f"**{total['mfu']:.1%}**", f"**{money(total['dollars'])}**"]])
    # DeepSeek-V3's efficiency: its pre-training FLOPs (leanseek's count for its config) per H800-hour
    v3 = ModelConfig.preset("deepseek-v3")
    v3_flops = v3.flops_per_token(4096) * DEEPSEEK_V3["tokens"]
    v3_per_hour = v3_flops / DEEPSEEK_V3["pretrain_gpu_hours"]
    v3_mfu = v3_per_hour / 3600 / (PEAK_TFLOPS["H800"] * 1e12)
    scaled = total["flops"] / v3_per_hour
    price = DEEPSEEK_V3["price"]
    published = md_table(["DeepSeek-V3 (report, Table 1)", "H800 GPU-hours", f"cost at ${price:g}/GPU-hour"],
                         [[s, f"{h / 1e3:,.0f}K", f"${h * price / 1e6:.3f}M"]
                          for s, h in [*DEEPSEEK_V3_GPU_HOURS.items(), ("total", sum(DEEPSEEK_V3_GPU_HOURS.values()))]])
    compare = md_table(["", "FLOPs", "device-hours", "cost"],
                       [["this run", si(total["flops"]), f"{total['device_hours']:.4f} {device}",
                         money(total["dollars"])],
                        ["the same FLOPs at DeepSeek-V3's efficiency", si(total["flops"]), f"{scaled:.2e} H800",
                         money(scaled * DEEPSEEK_V3["price"])],
                        ["DeepSeek-V3 pre-training (14.8T tokens)", si(v3_flops),
                         f"{DEEPSEEK_V3['pretrain_gpu_hours']:.4g} H800",
                         money(DEEPSEEK_V3["pretrain_gpu_hours"] * DEEPSEEK_V3["price"])]])
    _bar_plot(plots / "cost.png", [r["stage"] for r in rows], [r["seconds"] / 60 for r in rows],
              "wall time (minutes)", "where the time went")
    source = "measured: the best float32 matmul this machine reaches" if device == "CPU" else "its datasheet"
    return (f"## Cost\n\n{table}\n\nWall time is each stage's whole run (start-up, evaluations and checkpoints "
            f"included; for a training stage resumed after an interruption, at least its ledger's step time); "
            f"MFU is its FLOPs over wall time x devices x peak, the peak being "
            f"{peak:.3g} TFLOP/s per device ({source}). "
            f"Dollars at ${run.ledger.get('price_per_device_hour', 0):g} per {device}-hour. FLOPs are counted from the "
            "model's shape: 6 per active weight per trained token plus attention, a third of that per token "
            "generated or evaluated; tokenizing and writing data are not model FLOPs.\n\n"
            f"![time per stage](plots/cost.png)\n\nBeside DeepSeek-V3's published cost: its pre-training, counted "
            f"the same way, is {si(v3_flops)} FLOPs in {DEEPSEEK_V3['pretrain_gpu_hours'] / 1e6:.3f}M H800-hours, "
            f"{v3_mfu:.0%} MFU against the H800's {PEAK_TFLOPS['H800']:g} TFLOP/s dense bf16 peak.\n\n{compare}\n\n"
            f"{published}")


def pretraining_section(run: Run, plots: Path) -> str:
    m = run.metrics["pretrain"]
    if not m:
        return "## Pretraining\n\nno metrics"
    first = m[0]
    evals = [line for line in m if "val_bpb" in line]
    rows = [["untrained model", f"{first.get('initial_val_bpb', float('nan')):.3f}"],
            ["unigram (token frequencies)", f"{first.get('unigram_val_bpb', float('nan')):.3f}"]]
    rows += [[f"after {line['step']} steps", f"{line['val_bpb']:.3f}"] for line in evals]
    sft_evals = [line for line in run.metrics["sft"] if "val_bpb" in line]
    if sft_evals:
        rows.append([f"SFT model, step {sft_evals[-1]['step']}, on the SFT set's held-out conversations (assistant "
                     "tokens; a repeated definition may be in both)",
                     f"{sft_evals[-1]['val_bpb']:.3f}"])
    step_mfu = run.ledgers["pretrain"]["mfu"] if run.ledgers["pretrain"] else 0.0
    tps = sum(line["tokens_per_s"] for line in m) / len(m)
    plt = pyplot()

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([line["step"] for line in m], [line["ce"] for line in m], lw=0.8, label="train loss (nats/token)")
    ax[0].set_xlabel("step"), ax[0].legend(), ax[0].set_title("pretraining loss")
    start = [(0, first["initial_val_bpb"])] if "initial_val_bpb" in first else []
    points = start + [(line["step"], line["val_bpb"]) for line in evals]
    ax[1].plot([x for x, _ in points], [y for _, y in points], "o-", label="validation")
    if "unigram_val_bpb" in first:
        ax[1].axhline(first["unigram_val_bpb"], color="grey", ls="--", label="unigram baseline")
    ax[1].set_xlabel("step"), ax[1].set_ylabel("bits per byte"), ax[1].legend(), ax[1].set_title("validation bpb")
    _save(fig, plots / "pretrain.png")
    return (f"## Pretraining\n\nValidation bits per byte (UTF-8 bytes of the held-out corpus; lower is better). "
            f"Training ran at {tps:,.0f} tokens/s, {step_mfu:.0%} MFU over the training steps alone.\n\n"
            + md_table(["model", "val bpb"], rows) + "\n\n![pretraining](plots/pretrain.png)")


def task_section(run: Run, preset: dict, plots: Path) -> str:
    sft, rl = run.evals["sft"], run.evals["rl"]
    if not (sft and rl):
        return "## Reasoning task\n\nnot evaluated"
    k = sft["k"]
    keys = ["pass@1", "pass@1 sampled", f"pass@{k}", f"maj@{k}", "format", "length"]
    labels = ["pass@1 (greedy)", "pass@1 (sampled, t=1)", f"pass@{k}", f"maj@{k}", "well-formed", "mean length"]
    a, b = sft["metrics"]["all"], rl["metrics"]["all"]

    def fmt(key, v):
        return f"{v:.1f} tokens" if key == "length" else f"{v:.1%}"

    rows = [[label, fmt(key, a.get(key, 0)), fmt(key, b.get(key, 0))] for key, label in zip(keys, labels)]
    buckets = [[bucket, f"{sft['metrics'][bucket]['pass@1']:.1%}", f"{row['pass@1']:.1%}", row["n"]]
               for bucket, row in rl["metrics"].items() if bucket != "all"]
    plt = pyplot()

    m = run.metrics["rl"]
    evals = [line for line in m if "eval_pass@1" in line]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].bar([x - 0.2 for x in range(4)], [a.get(key, 0) for key in keys[:4]], 0.4, label="after SFT")
    ax[0].bar([x + 0.2 for x in range(4)], [b.get(key, 0) for key in keys[:4]], 0.4, label="after GRPO")
    ax[0].set_xticks(range(4), ["pass@1", "pass@1\nsampled", f"pass@{k}", f"maj@{k}"]), ax[0].set_ylim(0, 1)
    ax[0].legend(), ax[0].set_title(f"{rl['task']}: {a['n']} held-out problems")
    steps = [line["step"] for line in m if "reward" in line]
    ax[1].plot(steps, [line["reward"] for line in m if "reward" in line], lw=0.8, label="reward (samples)")
    ax[1].plot([line["step"] for line in evals], [line["eval_pass@1"] for line in evals], "o-",
               label="held-out pass@1 (greedy)")
    ax[1].set_xlabel("GRPO step"), ax[1].set_ylim(0, 1), ax[1].legend(), ax[1].set_title("GRPO")
    ax[2].plot(steps, [line["length"] for line in m if "reward" in line], lw=0.8)
    ax[2].set_xlabel("GRPO step"), ax[2].set_ylabel("tokens"), ax[2].set_title("mean completion length")
    _save(fig, plots / "rl.png")
    task = parse_mix(rl["task"])[0][0].name
    return (f"## Reasoning task\n\n`{task}` held-out problems, the same {a['n']} before and after GRPO "
            f"({preset['rl']['steps']} steps x {preset['rl']['prompts']} problems x {preset['rl']['group']} "
            f"samples). Rewards are rule-based: exact answer, one think block, end of turn. Sampled figures draw "
            f"{k} completions per problem at temperature {sft['temperature']:g}.\n\n"
            + md_table(["", "after SFT", "after GRPO"], rows) + "\n\n"
            + md_table(["bucket", "pass@1 after SFT", "after GRPO", "problems"], buckets)
            + "\n\n![GRPO](plots/rl.png)")


def definitions_section(run: Run) -> str:
    d = (run.probes or {}).get("definitions")
    if not d:
        return ("## Definitions\n\nWordNet is not installed here (Debian's wordnet-base), so neither the corpus nor "
                "the SFT set has definitions to ask about.")
    rows = [[group, r["n"], f"{d['sft'][group]['f1']:.2f}", f"{r['f1']:.2f}", f"{d['sft'][group]['f1>=0.5']:.0%}",
             f"{r['f1>=0.5']:.0%}", f"{r['chance_f1']:.2f}"] for group, r in d["rl"].items()]
    examples = [f"- *{e['word']}*: {e['reply']!r} (WordNet: {e['wordnet']!r}, F1 {e['f1']:.2f})"
                for r in d["rl"].values() for e in r["examples"]]
    return ("## Definitions\n\n\"What does 'w' mean?\" for words whose definitions SFT taught, and for words only "
            "the pretraining corpus (WordNet) defines. Score: word-overlap F1 of the greedy reply with WordNet's "
            "gloss; chance is the final model's F1 against another word's gloss.\n\n"
            + md_table(["words", "asked", "F1 after SFT", "after GRPO", "F1 >= 0.5 after SFT", "after GRPO",
                        "chance F1"], rows)
            + "\n\nThe final model's replies with the best, upper-quartile, median, lower-quartile and worst F1 of "
            "each group:\n\n" + "\n".join(examples))


def tools_section(run: Run) -> str:
    t = (run.probes or {}).get("tools")
    if not t:
        return ("## Tool use\n\nnot measured (no WordNet here, or a tokenizer made before tool support)")

    def share(x):
        return "-" if x is None else f"{x:.0%}"

    def row(name, pick):
        return [name, *(pick(t[stage]) for stage in ("sft", "rl"))]

    rows = [row("definition F1 without the tool", lambda r: f"{r['without tool']['f1']:.2f}"),
            row("definition F1 with the tool", lambda r: f"{r['with tool']['f1']:.2f}"),
            row("chance F1", lambda r: f"{r['without tool']['chance_f1']:.2f}"),
            row("replies that called the tool", lambda r: share(r["with tool"]["replies with a call"])),
            row("well-formed calls", lambda r: share(r["with tool"]["well-formed calls"])),
            row("taught words looked up", lambda r: share(r["taught words looked up"]))]
    examples = [f"- *{e['word']}*: {e['reply']!r} (WordNet: {e['wordnet']!r}, F1 {e['f1']:.2f})"
                for e in t["rl"]["with tool"]["examples"]]
    return (f"## Tool use\n\n\"What does 'w' mean?\" for {t['rl']['with tool']['n']} words no SFT conversation "
            "holds, asked without tools and with the built-in `define` tool offered (the chat runs the calls and "
            "the model continues). Score: word-overlap F1 of the final answer with WordNet's first sense.\n\n"
            + md_table(["", "after SFT", "after GRPO"], rows)
            + "\n\nThe final model's answers with the tool (best, quartiles, worst):\n\n" + "\n".join(examples))


def experts_section(run: Run, plots: Path) -> str:
    e = (run.probes or {}).get("experts")
    if not e:
        return "## Expert load\n\nnot measured"
    rows = [[f"layer {layer}", f"{pre:.2f}", f"{fin:.2f}", f"{max(s) * len(s):.2f}x"]
            for layer, pre, fin, s in zip(e["rl"]["layers"], e["pretrain"]["maxvio"], e["rl"]["maxvio"],
                                          e["rl"]["share"])]
    plt = pyplot()

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    share = torch.tensor(e["rl"]["share"])
    im = ax[0].imshow((share * share.shape[1]).numpy(), aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
    ax[0].set_yticks(range(len(e["rl"]["layers"])), [f"layer {x}" for x in e["rl"]["layers"]])
    ax[0].set_xlabel("routed expert"), ax[0].set_title("final model: load / mean load")
    fig.colorbar(im, ax=ax[0])
    m = run.metrics["pretrain"]
    ax[1].plot([line["step"] for line in m], [line["maxvio"] for line in m], lw=0.8, label="mean over layers")
    ax[1].plot([line["step"] for line in m], [line["maxvio_max"] for line in m], lw=0.8, label="worst layer")
    ax[1].set_xlabel("pretraining step"), ax[1].set_ylabel("MaxVio"), ax[1].set_yscale("log"), ax[1].legend()
    ax[1].set_title("balance during pretraining (batch MaxVio)")
    _save(fig, plots / "experts.png")
    return (f"## Expert load\n\nShare of routed-expert slots per MoE layer on {e['rl']['tokens']:,} validation tokens. "
            "MaxVio = (busiest expert's load - mean) / mean (V3 report section 4.5.2; 0 is perfect balance). Balance "
            "comes from the auxiliary-loss-free bias (Eqs. 16) plus a tiny sequence-wise loss (Eq. 17).\n\n"
            + md_table(["", "MaxVio, pretrained", "MaxVio, final", "busiest expert / mean"], rows)
            + "\n\n![expert load](plots/experts.png)")


def mtp_section(run: Run) -> str:
    a = (run.probes or {}).get("mtp_acceptance")
    if not a:
        return "## MTP\n\nnot measured"
    rows = [[name, f"{v['rate']:.1%}" if v["rate"] is not None else "-", v["drafted"]] for name, v in a.items()]
    return ("## MTP\n\nThe multi-token-prediction module drafts the next token during greedy self-speculative "
            "decoding (`leanseek serve`'s engine with `speculative=True`); the main model accepts a draft when it "
            "agrees. SFT trains the module with the model, or (where SFT leaves the MTP loss out) a stage after it "
            "trains the module alone; GRPO trains the main model only. DeepSeek-V3 reports "
            "85-90% acceptance at its scale.\n\n" + md_table(["model", "acceptance", "drafts"], rows))


def kv_section(run: Run) -> str:
    kv = (run.probes or {}).get("kv_cache")
    if not kv:
        return "## KV cache\n\nnot measured"
    return ("## KV cache\n\nMLA caches one compressed latent and one RoPE key per layer and token; standard "
            "multi-head attention with the same heads would cache every head's key and value.\n\n"
            + md_table(["", "MLA (leanseek)", "standard attention", ""],
                       [["bytes per token", f"{kv['mla_bytes_per_token']:,}", f"{kv['mha_bytes_per_token']:,}",
                         f"{kv['reduction']:.0%} smaller"],
                        [f"{kv['max_batch']} sequences x {kv['max_len']} tokens ({kv['dtype']})",
                         f"{kv['mla_cache_bytes'] / 2**20:.1f} MiB", f"{kv['mha_cache_bytes'] / 2**20:.1f} MiB", ""]]))


def samples_section(run: Run) -> str:
    probes = run.probes or {}

    def turn(t: dict) -> str:
        thinking = f"> *thinking:* {t['reasoning'].strip()}\n\n" if t["reasoning"] else ""
        return f"**User:** {t['user']}\n\n{thinking}**leanseek:** {t['content']}"

    out = ["## Sample conversations\n\nGreedy replies of the final model (what `leanseek serve` answers at "
           "temperature 0), each to a first message:", *map(turn, probes.get("samples") or [])]
    if probes.get("conversation"):
        out += ["And one conversation, its history sent back as the web chat sends it (answers without their "
                "reasoning):", *map(turn, probes["conversation"])]
    return "\n\n".join(out)


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_plot(path: Path, labels: list[str], values: list[float], xlabel: str, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1])
    ax.set_xlabel(xlabel), ax.set_title(title)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    plt = pyplot()

    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
