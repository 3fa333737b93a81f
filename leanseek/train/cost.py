"""What a training run costs: FLOPs from the config, device-hours at a peak and an MFU, dollars at a price.

DeepSeek reported V3's cost this way (V3 report Table 1): 2.788M H800 GPU-hours at $2 per GPU-hour, $5.576M, of
which pre-training on 14.8T tokens took 2.664M GPU-hours ($5.328M).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..model.config import ModelConfig

# DeepSeek-V3 report, Table 1: H800 GPU-hours per training stage (pre-training on 14.8T tokens), $2 per GPU-hour
DEEPSEEK_V3_GPU_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}
# dense bf16 peaks, TFLOP/s per device (vendor datasheets; the H800 is an H100 with slower interconnect)
PEAK_TFLOPS = {"H800": 989.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
DEEPSEEK_V3 = {"tokens": 14.8e12, "pretrain_gpu_hours": DEEPSEEK_V3_GPU_HOURS["pre-training"], "price": 2.0}


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
    """The device's peak for `dtype` matmuls, TFLOP/s: a datasheet figure for known GPUs, else measured with a
    large matmul (on a CPU, this is the best the BLAS library reaches with the threads torch uses)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return (peak if dtype == torch.bfloat16 else peak / 2), f"{name} datasheet"
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
