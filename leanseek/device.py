"""Where a subcommand runs: one policy for every command that runs a model.

    add_device_arguments(parser)          # --device auto|cpu|cuda|cuda:N (default auto), --threads
    device = use_device(args)             # under torchrun, auto is cuda:LOCAL_RANK
    model.to(device, inference_dtype(device))

auto is the first GPU when there is one (under torchrun, the GPU of this process's LOCAL_RANK), else the CPU. On a
GPU, float32 matmuls run in TF32 (about 8x the float32 rate on A100/H100, with a 10-bit mantissa that training and
inference tolerate), and inference runs in bf16.
"""

from __future__ import annotations

import argparse
import os

import torch

def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's; else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine() or "unknown CPU"


# dollars per device-hour when the user gives no --price: DeepSeek's own figure for an H800 (V3 report, Table 1),
# and roughly what a few cloud CPU cores cost
GPU_PRICE, CPU_PRICE = 2.0, 0.05


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where to run: auto (the first GPU when there is one, else the CPU), cpu, cuda or "
                             "cuda:N (default: auto)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --threads: where a command runs."""
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled decode steps, 2-3x faster at small batches: compiled at start-up, once "
                             "(about 20 s per batch size on a 2-core CPU), then loaded from the compile cache (a few "
                             "seconds); default: on for the CPU, off for GPUs (not yet measured there)")


def add_prefix_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the latent cache of a prompt's longest prefix computed before (a shared system "
                             "prompt, a chat's history), prefilling only the rest; replies are the same without it "
                             "(default: on)")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="CPU only: int8 weights and per-token int8 activations (a quarter of float32's memory, "
                             "faster matmuls), or int4 weights in groups of 32 (an eighth, slower on AVX2); "
                             "quantised models decode eagerly (leanseek.infer.quantize)")


def quantize_mode(args: argparse.Namespace, device: torch.device) -> str | None:
    """What load_hf(quantize=...) gets from --quantize; on a device other than the CPU the command ends with why."""
    if args.quantize and device.type != "cpu":
        raise SystemExit(f"--quantize runs on PyTorch's CPU kernels: add --device cpu (not {device})")
    return args.quantize


def wants_compile(args: argparse.Namespace, device: torch.device, v4: bool = False) -> bool:
    if v4:  # DeepSeek-V4's decode state is eager only (leanseek.infer.compressed_cache)
        if args.compile:
            raise SystemExit("--compile does not apply to DeepSeek-V4 models: they decode eagerly")
        return False
    if args.quantize:
        if args.compile:
            raise SystemExit("--compile does not apply to --quantize: quantised models decode eagerly")
        return False
    return args.compile if args.compile is not None else device.type == "cpu"


def use_device(args: argparse.Namespace, local_rank: int | None = None) -> torch.device:
    """The device of args.device (see pick_device), after setting torch's CPU threads to args.threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device, local_rank)


def pick_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device `spec` names. auto: cuda:LOCAL_RANK under torchrun (or `local_rank` when given), the first GPU
    otherwise, the CPU when there is no GPU. Turns on TF32 for float32 matmuls on CUDA."""
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = f"cuda:{local_rank or 0}"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec!r}: no CUDA GPU is available (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
    index = device.index if device.index is not None else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec!r}: GPU {index} is not there ({torch.cuda.device_count()} visible)")
    torch.set_float32_matmul_precision("high")  # float32 matmuls in TF32 (torch.backends.cuda.matmul.allow_tf32)
    return torch.device("cuda", index)


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype the engine runs a model in: bf16 on GPUs with native bf16 matmuls (Ampere and later), float32
    elsewhere (CPU bf16 matmuls are slower than float32 ones on most CPUs)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def default_price(device: torch.device) -> float:
    """Dollars per device-hour when none is given: the one place default prices live."""
    return GPU_PRICE if torch.device(device).type == "cuda" else CPU_PRICE
