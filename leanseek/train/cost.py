"""What a training run costs: FLOPs from the config, device-hours at a peak and an MFU, dollars at a price; the
GPUs' datasheet peaks; and `leanseek cost`, the estimate for a run never made.

DeepSeek reported V3's cost this way (V3 report Table 1): 2.788M H800 GPU-hours at $2 per GPU-hour, $5.576M, of
which pre-training on 14.8T tokens took 2.664M GPU-hours ($5.328M).
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict, dataclass

import torch

from ..console import table
from ..device import default_price
from ..model.config import ModelConfig
from ..model.describe import resolve_config

# DeepSeek-V3 report, Table 1: H800 GPU-hours per training stage (pre-training on 14.8T tokens), $2 per GPU-hour
DEEPSEEK_V3_GPU_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}
DEEPSEEK_V3 = {"tokens": 14.8e12, "pretrain_gpu_hours": DEEPSEEK_V3_GPU_HOURS["pre-training"], "price": 2.0}


@dataclass(frozen=True)
class Peak:
    """Dense (no 2:4 sparsity) peak TFLOP/s of one GPU: bf16/fp16 and TF32 tensor-core matmuls, plain float32."""

    bf16: float
    tf32: float
    fp32: float


# Vendor datasheets (rounded), halved where they quote 2:4-sparse figures: nvidia.com/en-us/data-center/ h100
# (SXM, PCIe, NVL), h200 (SXM, NVL), a100, hgx (HGX B200, per GPU), l40s, and the GH200 and H20 product briefs. The
# H800 and A800 are the H100 and A100 with slower NVLink: the same compute. Each GPU: (the name `leanseek cost
# --device` takes, a pattern for the name CUDA reports, its peaks); the first match wins, so variants come first.
GPUS: list[tuple[str, str, Peak]] = [
    ("H100-PCIe", r"\bH100\b.*\bPCIe\b", Peak(756.0, 378.0, 51.0)),     # "NVIDIA H100 PCIe"
    ("H100-NVL", r"\bH100\b.*\bNVL\b", Peak(835.0, 417.5, 60.0)),       # "NVIDIA H100 NVL"
    ("H100", r"\bH100\b", Peak(989.0, 494.5, 67.0)),                    # SXM: "NVIDIA H100 80GB HBM3"
    ("H800-PCIe", r"\bH800\b.*\bPCIe\b", Peak(756.0, 378.0, 51.0)),
    ("H800", r"\bH800\b", Peak(989.0, 494.5, 67.0)),                    # SXM: "NVIDIA H800"
    ("H200-NVL", r"\bH200\b.*\bNVL\b", Peak(835.0, 417.5, 60.0)),
    ("H200", r"\bH200\b", Peak(989.0, 494.5, 67.0)),                    # SXM: "NVIDIA H200"
    ("GH200", r"\bGH200\b", Peak(989.0, 494.5, 67.0)),                  # "NVIDIA GH200 480GB"
    ("H20", r"\bH20\b", Peak(148.0, 74.0, 44.0)),
    ("A100", r"\bA100\b", Peak(312.0, 156.0, 19.5)),                    # "NVIDIA A100-SXM4-80GB", "... PCIe"
    ("A800", r"\bA800\b", Peak(312.0, 156.0, 19.5)),
    ("B200", r"\bB200\b", Peak(2250.0, 1100.0, 75.0)),
    ("L40S", r"\bL40S\b", Peak(362.0, 183.0, 91.6)),
]
# dense bf16 peaks by name, TFLOP/s per device
PEAK_TFLOPS = {name: peak.bf16 for name, _, peak in GPUS}


def gpu_peak(name: str, dtype: torch.dtype, tf32: bool = True) -> tuple[float, str] | None:
    """The datasheet peak, TFLOP/s, of `dtype` matmuls on the GPU CUDA calls `name` (None for an unknown GPU):
    bf16/fp16 on tensor cores; float32 on tensor cores in TF32 when `tf32` is on, else on the float32 units."""
    for key, pattern, peak in GPUS:
        if re.search(pattern, name, re.IGNORECASE):
            if dtype in (torch.bfloat16, torch.float16):
                return peak.bf16, f"{name}: {key} datasheet, dense {str(dtype).removeprefix('torch.')}"
            if tf32:
                return peak.tf32, f"{name}: {key} datasheet, dense TF32 (float32 matmuls run in TF32)"
            return peak.fp32, f"{name}: {key} datasheet, float32 (TF32 off)"
    return None


@dataclass(frozen=True)
class CostEstimate:
    flops: float
    device_hours: float
    dollars: float

    @classmethod
    def for_run(cls, cfg: ModelConfig, tokens: float, seq_len: int, peak_tflops: float, mfu: float,
                price: float) -> "CostEstimate":
        """Training `tokens` tokens at context `seq_len` on devices of `peak_tflops`, achieving `mfu` of it."""
        if not 0 < mfu <= 1:
            raise ValueError(f"mfu={mfu}: must be in (0, 1]")
        if peak_tflops <= 0 or tokens <= 0:
            raise ValueError(f"peak_tflops={peak_tflops}, tokens={tokens}: both must be positive")
        flops = cfg.flops_per_token(seq_len) * tokens
        hours = flops / (peak_tflops * 1e12 * mfu) / 3600
        return cls(flops, hours, hours * price)


def forward_flops(cfg: ModelConfig, seq_len: int, tokens: int) -> float:
    """FLOPs of `tokens` tokens through the model forward only (generation, evaluation): a third of training's."""
    return cfg.flops_per_token(seq_len, include_mtp=False) / 3 * tokens


def detect_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak for `dtype` matmuls, TFLOP/s, and where the figure comes from: a datasheet figure for
    known GPUs (TF32 for float32 when torch runs float32 matmuls in TF32, as pick_device sets up), else measured
    with a large matmul (on a CPU, this is the best the BLAS library reaches with the threads torch uses)."""
    if device.type == "cuda":
        known = gpu_peak(torch.cuda.get_device_name(device), dtype, torch.backends.cuda.matmul.allow_tf32)
        if known is not None:
            return known
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12, f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


@dataclass
class Ledger:
    """Running totals of what a training run cost; carried across resumes in the trainer state."""

    wall_seconds: float = 0.0
    devices: int = 1
    tokens: int = 0
    flops: float = 0.0
    peak_tflops: float = 0.0
    price_per_device_hour: float = 0.0

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.devices / 3600

    @property
    def mfu(self) -> float:
        return self.flops / max(self.wall_seconds * self.devices * self.peak_tflops * 1e12, 1e-9)

    @property
    def dollars(self) -> float:
        return self.device_hours * self.price_per_device_hour

    def summary(self) -> dict:
        return {**asdict(self), "device_hours": self.device_hours, "mfu": self.mfu, "dollars": self.dollars}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset name, model folder or config.json")
    p.add_argument("--tokens", type=float, required=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--device", default="H800", choices=list(PEAK_TFLOPS), metavar="GPU",
                   help=f"take the peak from this GPU's dense bf16 datasheet figure: {', '.join(PEAK_TFLOPS)} "
                        f"(H100, H800, H200: SXM; default: H800)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (overrides --device)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation achieved, 0-1")
    p.add_argument("--price", type=float, default=default_price(torch.device("cuda")),
                   help="dollars per device-hour (default: %(default)g)")


def run(args) -> None:
    cfg = resolve_config(args.preset)
    peak = PEAK_TFLOPS[args.device] if args.peak_tflops is None else args.peak_tflops
    est = CostEstimate.for_run(cfg, args.tokens, args.seq_len, peak, args.mfu, args.price)
    rows = [["training FLOPs per token", f"{cfg.flops_per_token(args.seq_len):.4g}"],
            ["total FLOPs", f"{est.flops:.4g}"],
            ["device peak / MFU", f"{peak:g} TFLOP/s / {args.mfu:.0%}"],
            ["device-hours", f"{est.device_hours:,.0f}"],
            ["cost", f"${est.dollars:,.0f} at ${args.price:g} per device-hour"]]
    print(table(rows, [f"{args.preset}, {args.tokens:.4g} tokens at {args.seq_len}", ""]))
    if args.preset == "deepseek-v3":
        ref = DEEPSEEK_V3
        scale = args.tokens / ref["tokens"]
        hours = ref["pretrain_gpu_hours"]
        print(f"\nDeepSeek-V3 report, Table 1: pre-training {ref['tokens']:.3g} tokens took {hours / 1e6:.3f}M H800 "
              f"GPU-hours (${hours * ref['price'] / 1e6:.3f}M); for {args.tokens:.3g} tokens that is "
              f"{hours * scale / 1e6:.3f}M. This estimate: {est.device_hours / 1e6:.3f}M "
              f"({est.device_hours / (hours * scale):.2f}x).")
