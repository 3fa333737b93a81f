"""Where a pretraining step's time goes: `leanseek pretrain`'s own step (the objective with its MTP and balance
losses, bf16 autocast on GPUs, fused AdamW, clipping) on random tokens, timed, then one step under torch.profiler:
each operator's device time (the GPU's kernels; on a CPU, its own CPU time), the host's synchronisations, and the
step's wall time against the device's busy time (a GPU busy for a small part of the step waits on the host:
launches, Python, synchronisations).

    python benchmarks/train_profile.py --device cuda --preset small --batch-size 64 --seq-len 1024 [--compile]
    .venv/bin/python benchmarks/train_profile.py --device cpu --preset tiny --batch-size 4 --seq-len 128
"""

import argparse
import contextlib
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from harness import cpu_model
from torch.profiler import ProfilerActivity, profile

import leanseek
from leanseek.device import pick_device
from leanseek.train.cost import detect_peak_tflops
from leanseek.train.loop import Objective, Place, build_optimizer, train_step, wrap

SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpyAsync")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--compile", action="store_true", help="as `leanseek pretrain --compile`")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = leanseek.ModelConfig.preset(args.preset)
    model = leanseek.Transformer(cfg).to(device)
    objective = Objective(model, mtp_weight=0.3, balance_weight=1e-4)
    opts = SimpleNamespace(compile=args.compile, mtp_weight=0.3, weight_decay=0.1, lr=3e-4, optimizer_impl="auto")
    place = Place(rank=0, world=1, device=device, sharded=False)
    forward = wrap(objective, opts, place)
    optimizer = build_optimizer(model, opts, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    routers = len(model.routers(mtp=True))
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))
    batches = [(x[:, :-1], x[:, 1:])]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        train_step(forward, objective, optimizer, batches, place, routers, autocast)

    where = torch.cuda.get_device_name(device) if cuda else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"# {where}, torch {torch.__version__}; preset {args.preset} ({cfg.param_counts()}); batch "
          f"{args.batch_size} x {args.seq_len}, {'bf16 autocast' if cuda else 'float32'}"
          f"{', compiled' if args.compile else ''}")
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    sync()
    print(f"warm-up (2 steps{', compilation' if args.compile else ''}): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / args.steps
    tokens = args.batch_size * args.seq_len
    peak = detect_peak_tflops(device, torch.bfloat16 if cuda else torch.float32)[0]
    achieved = cfg.flops_per_token(args.seq_len, include_mtp=True) * tokens / wall / 1e12
    print(f"step: {wall * 1e3:.1f} ms, {tokens / wall:,.0f} tokens/s, {achieved:.1f} TFLOP/s = "
          f"{achieved / peak:.1%} MFU of {peak:g}")
    if cuda:
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    busy = sum(own(e) for e in events if own(e) > 0) / 1e3
    print(f"\nprofiled step: device busy {busy:.1f} ms of the step's {wall * 1e3:.1f} ms wall ({busy / wall / 1e3:.0%})"
          if cuda else f"\nprofiled step: operators' own CPU time {busy:.1f} ms")
    syncs = {e.key: e.count for e in events if e.key in SYNCS}
    print("host synchronisations and copies: " + (", ".join(f"{k} x{v}" for k, v in syncs.items()) or "none"))
    if cuda:
        launches = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        print(f"kernel launches: {sum(e.count for e in events if e.key in launches)}")
    print(f"\n{'operator or kernel':<70} {'calls':>7} {'own ms':>9} {'share':>6}")
    rows = sorted((e for e in events if own(e) > 0), key=own, reverse=True)
    for e in rows[:args.top]:
        print(f"{e.key[:70]:<70} {e.count:>7} {own(e) / 1e3:>9.2f} {own(e) / 1e3 / busy:>6.1%}")
    by_family = defaultdict(float)
    for e in rows:
        by_family[family(e.key)] += own(e) / 1e3
    print("\nby family: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])))


def family(name: str) -> str:
    lowered = name.lower()
    for label, keys in (("matmul", ("gemm", "aten::mm", "aten::bmm", "aten::addmm", "cutlass", "nvjet", "sm90_xmma")),
                        ("attention", ("flash", "attention", "fmha", "softmax")),
                        ("optimizer", ("adam",)),
                        ("index/scatter/sort", ("index", "scatter", "gather", "sort", "radix", "cumsum", "topk"))):
        if any(k in lowered for k in keys):
            return label
    return "other (elementwise, norms, copies, reductions)"


if __name__ == "__main__":
    main()
