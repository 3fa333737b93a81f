"""What a training run costs: FLOPs from the config, device-hours at a peak and an MFU, dollars at a price.

DeepSeek reported V3's cost this way (V3 report Table 1): 2.788M H800 GPU-hours at $2 per GPU-hour, $5.576M, of
which pre-training on 14.8T tokens took 2.664M GPU-hours ($5.328M).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig

# dense bf16 peaks, TFLOP/s per device (vendor datasheets; the H800 is an H100 with slower interconnect)
PEAK_TFLOPS = {"H800": 989.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
DEEPSEEK_V3 = {"tokens": 14.8e12, "pretrain_gpu_hours": 2.664e6, "total_gpu_hours": 2.788e6, "price": 2.0}


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
