"""Where a batch-1 decode step's time goes, eager and compiled: torch.profiler over greedy decoding, each operator's
own CPU time per token, grouped (matmuls, gathers, norms, the compiled graph, torch.compile's guard check), and
what is left of the wall time outside all operators: the engine's Python and PyTorch's dispatch.

    .venv/bin/python benchmarks/decode_profile.py [--model runs/speedrun-cpu/rl | --preset tiny] [--threads 2]

The wall time per token is measured without the profiler (best of 3), the split with it (the profiler adds a little
to every operator call, so the shares, not the sums, are what to read).
"""

import argparse
from collections import defaultdict

import torch
from harness import best_of, cpu_model, model_or_preset
from torch.profiler import ProfilerActivity, profile

import leanseek

GROUPS = {
    "matmul (mm, bmm, addmm)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
    "gather (index_select, index: MoE expert weights, cache rows)": ("aten::index_select", "aten::index",
                                                                   "aten::gather", "aten::_index_put_impl_"),
    "norms (rms_norm and its parts)": ("aten::_fused_rms_norm", "aten::rms_norm", "aten::rsqrt", "aten::pow",
                                       "aten::mean"),
    "compiled graph (inductor's kernels)": ("## Call CompiledFxGraph",),
    "torch.compile guard check": ("TorchDynamo Cache Lookup",),
    "views and copies (view, reshape, slice, transpose, copy, to)": (
        "aten::view", "aten::reshape", "aten::slice", "aten::transpose", "aten::as_strided", "aten::copy_",
        "aten::_to_copy", "aten::to", "aten::t", "aten::unsqueeze", "aten::select", "aten::expand",
        "aten::_unsafe_view", "aten::empty_strided", "aten::empty", "aten::clone", "aten::contiguous",
        "aten::view_as_complex", "aten::view_as_real"),
}


def group(name: str) -> str:
    for label, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return label
    return "other operators (elementwise, softmax, topk, ...)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a run folder or checkpoint (default: a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024, help="the engine's context (serve's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = model_or_preset(args.model, args.preset)
    prompt = torch.randint(3, model.cfg.vocab_size, (32,)).tolist()
    n = args.tokens
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}; {model.cfg.param_counts()}; "
          f"batch 1, a 32-token prompt, {n} new tokens, context {args.max_len}")
    for name, compiled in (("eager", False), ("compiled", True)):
        engine = leanseek.Engine(model, max_batch=16, max_len=args.max_len, compile=compiled)
        engine.warm_up(progress=False)
        engine.generate([prompt], max_new_tokens=n)
        first = best_of(lambda: engine.generate([prompt], max_new_tokens=1), 3)
        whole = best_of(lambda: engine.generate([prompt], max_new_tokens=n + 1), 3)
        per_token = (whole - first) / n * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate([prompt], max_new_tokens=n + 1)
        with profile(activities=[ProfilerActivity.CPU]) as prefill_only:
            engine.generate([prompt], max_new_tokens=1)
        own = defaultdict(float)
        for run, sign in ((prof, 1), (prefill_only, -1)):  # the decode steps' share: less the prefill's
            for event in run.key_averages():
                own[group(event.key)] += sign * event.self_cpu_time_total / 1e3 / n
        profiled = (max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
                    - max(e.time_range.end for e in prefill_only.events())
                    + min(e.time_range.start for e in prefill_only.events())) / 1e3 / n
        print(f"\n{name}: {per_token:.2f} ms a token ({1e3 / per_token:,.0f} tok/s) without the profiler; "
              f"{profiled:.2f} ms with it")
        print("| part | ms a token | share |\n|---|---|---|")
        parts = sorted(own.items(), key=lambda kv: -kv[1])
        outside = profiled - sum(own.values())
        for label, ms in parts + [("outside every operator: the engine's Python, dispatch", outside)]:
            if ms >= 0.005:
                print(f"| {label} | {ms:.2f} | {ms / profiled:.0%} |")


if __name__ == "__main__":
    main()
