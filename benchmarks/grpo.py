"""GRPO's headline demonstration on this CPU: reasoning learned by reinforcement, with the two controls that make
the claim honest (spec/grpo.md section 6.3), side by side from the same starting model.

    .venv/bin/python benchmarks/grpo.py --init runs/sft-sums [--steps 60] [--out runs/grpo-demo]

The starting model is one leanseek pretrains and fine-tunes itself (about 15 minutes on 2 cores):

    leanseek pretrain --data runs/data-builtin --out runs/pretrain-tiny --preset tiny --steps 1000
    leanseek sft --init runs/pretrain-tiny --data task:sums --out runs/sft-sums --steps 600 --seq-len 128 \\
        --batch-size 32

Its SFT data answers half the sums by writing the running sums in <think> and half at once ("think or guess").
Three arms, run one after the other through the CLI:
- GRPO: `leanseek rl --task sums` for --steps steps;
- more SFT: `leanseek sft --data task:sums` for as many steps as fit in GRPO's wall time (same compute);
- shuffled rewards: GRPO with the rewards permuted over each batch, same steps.
Each is evaluated on the same held-out problems: greedy pass@1, sampled pass@1 and pass@8 (temperature 1), mean
completion length. Curves of held-out pass@1, training reward and mean completion length against step go to
OUT/grpo.png; the figures to OUT/summary.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def cli(*args: str) -> float:
    """Run a leanseek subcommand; returns its wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "leanseek", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"leanseek {args[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def held_out(path: Path, problems: int, k: int, threads: int) -> dict:
    import leanseek
    from leanseek.data import TextTokenizer
    from leanseek.eval.tasks import evaluate
    from leanseek.tasks import get_task
    from leanseek.train.checkpoint import checkpoint_of

    torch.set_num_threads(threads)
    ckpt = checkpoint_of(path)
    model, tok = leanseek.load_hf(ckpt), TextTokenizer.load(ckpt)
    task = get_task("sums")
    test = task.test_set(problems)
    engine = leanseek.Engine(model, tok, max_batch=128, max_len=128)
    return evaluate(engine, tok, task, test, k=k, max_new_tokens=64, seed=1)[0]["all"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/sft-sums", help="the SFT model to start from")
    ap.add_argument("--out", default="runs/grpo-demo")
    ap.add_argument("--steps", type=int, default=60, help="GRPO steps (16 problems x 8 samples each)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--problems", type=int, default=500, help="held-out problems for the final evaluations")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    init, out = Path(args.init), Path(args.out)
    if not (init / "metrics.jsonl").exists():
        sys.exit(f"{init}: no SFT run there; see --help for the two commands that make one")
    out.mkdir(parents=True, exist_ok=True)
    rl = ["rl", "--init", str(init), "--task", "sums", "--steps", str(args.steps), "--lr", str(args.lr),
          "--max-new-tokens", "64", "--eval-every", "10", "--eval-problems", "200", "--save-every", str(args.steps),
          "--threads", str(args.threads)]
    arms = {}
    arms["grpo"] = cli(*rl, "--out", str(out / "grpo"))
    # the same compute as more SFT: as many steps as the SFT run's median step time fits in GRPO's wall time
    sft_step = statistics.median(x["seconds"] for x in lines(init) if "seconds" in x)
    sft_steps = max(1, round(arms["grpo"] / sft_step))
    arms["more SFT"] = cli("sft", "--init", str(init), "--data", "task:sums", "--out", str(out / "more-sft"),
                           "--steps", str(sft_steps), "--seq-len", "128", "--batch-size", "32", "--lr", "1e-4",
                           "--warmup-steps", "0", "--decay-frac", "0", "--seed", "1", "--save-every",
                           str(sft_steps), "--eval-every", str(sft_steps), "--threads", str(args.threads))
    arms["shuffled rewards"] = cli(*rl, "--shuffle-rewards", "--out", str(out / "shuffled"))
    folders = {"start (SFT)": init, "grpo": out / "grpo", "more SFT": out / "more-sft",
               "shuffled rewards": out / "shuffled"}
    results = {name: held_out(folder, args.problems, args.k, args.threads) for name, folder in folders.items()}
    k = args.k
    print(f"# sums ('think or guess'), {args.problems} held-out problems; GRPO {args.steps} steps of 16 x 8 "
          f"samples; more SFT {sft_steps} steps; {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':<18} {'wall s':>7} {'pass@1':>7} {'sampled':>8} {f'pass@{k}':>7} {f'maj@{k}':>6} {'length':>7}")
    for name, r in results.items():
        wall = f"{arms[name]:.0f}" if name in arms else "-"
        print(f"{name:<18} {wall:>7} {r['pass@1']:>7.3f} {r['pass@1 sampled']:>8.3f} {r[f'pass@{k}']:>7.3f} "
              f"{r[f'maj@{k}']:>6.3f} {r['length']:>7.1f}")
    gain = results["grpo"]["pass@1"] - results["start (SFT)"]["pass@1"]
    print(f"GRPO: {gain * 100:+.1f} points of greedy pass@1 in {arms['grpo']:.0f} s (evaluations included)")
    summary = {"steps": args.steps, "sft_steps": sft_steps, "wall_seconds": arms, "results": results,
               "pass@1_gain_points": gain * 100}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(out, {"GRPO": lines(out / "grpo"), "shuffled rewards": lines(out / "shuffled")},
         results["more SFT"]["pass@1"], args.steps)
    print(f"curves: {out / 'grpo.png'}; figures: {out / 'summary.json'}")


def plot(out: Path, runs: dict[str, list[dict]], sft_pass: float, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in runs.items():
        evals = [(x["step"], x["eval_pass@1"]) for x in rows if "eval_pass@1" in x]
        axes[0].plot(*zip(*evals), marker="o", label=name)
        train = [x for x in rows if "reward" in x]
        axes[1].plot([x["step"] for x in train], _smooth([x["reward"] for x in train]), label=name)
        axes[2].plot([x["step"] for x in train], _smooth([x["length"] for x in train]), label=name)
    axes[0].plot([steps], [sft_pass], marker="s", linestyle="none", label="more SFT (same compute)")
    for ax, title in zip(axes, ["held-out greedy pass@1", "training reward (accuracy)",
                                "mean completion length (tokens)"]):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("GRPO on 'think or guess' sums, tiny model, 2-core CPU")
    fig.tight_layout()
    fig.savefig(out / "grpo.png", dpi=110)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


if __name__ == "__main__":
    main()
