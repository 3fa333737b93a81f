import pytest
import torch

from leanseek import ModelConfig
from leanseek.cli import main
from leanseek.train.cost import DEEPSEEK_V3, CostEstimate, detect_peak_tflops, gpu_peak


def test_deepseek_v3_estimate_lands_near_the_published_cost():
    """14.8T tokens on H800s (989 dense bf16 TFLOP/s) at 45% MFU: within 10% of the report's 2.664M GPU-hours."""
    cfg = ModelConfig.preset("deepseek-v3")
    est = CostEstimate.for_run(cfg, 14.8e12, 4096, peak_tflops=989, mfu=0.45, price=2.0)
    assert est.flops == pytest.approx(cfg.flops_per_token(4096) * 14.8e12)
    assert est.device_hours == pytest.approx(DEEPSEEK_V3["pretrain_gpu_hours"], rel=0.1)
    assert est.dollars == pytest.approx(2.0 * est.device_hours)
    with pytest.raises(ValueError, match="mfu=1.5"):
        CostEstimate.for_run(cfg, 1e12, 4096, 989, 1.5, 2.0)


def test_cost_command(capsys):
    main(["cost", "--preset", "deepseek-v3", "--tokens", "14.8e12", "--peak-tflops", "989", "--mfu", "0.4",
          "--price", "2"])
    out = capsys.readouterr().out
    assert "3,032,968" in out and "2.664M H800 GPU-hours" in out


# names as torch.cuda.get_device_name reports them -> dense (bf16, TF32, float32) datasheet peaks, TFLOP/s
GPU_NAMES = {
    "NVIDIA H100 80GB HBM3": (989, 494.5, 67),  # SXM
    "NVIDIA H100 PCIe": (756, 378, 51),
    "NVIDIA H100 NVL": (835, 417.5, 60),
    "NVIDIA H800": (989, 494.5, 67),  # SXM
    "NVIDIA H800 PCIe": (756, 378, 51),
    "NVIDIA H200": (989, 494.5, 67),
    "NVIDIA H200 NVL": (835, 417.5, 60),
    "NVIDIA GH200 480GB": (989, 494.5, 67),
    "NVIDIA H20": (148, 74, 44),
    "NVIDIA A100-SXM4-80GB": (312, 156, 19.5),
    "NVIDIA A100 80GB PCIe": (312, 156, 19.5),
    "NVIDIA B200": (2250, 1100, 75),
}


@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_peaks_by_the_name_cuda_reports(name):
    bf16, tf32, fp32 = GPU_NAMES[name]
    assert gpu_peak(name, torch.bfloat16)[0] == bf16
    assert gpu_peak(name, torch.float16)[0] == bf16
    peak, source = gpu_peak(name, torch.float32, tf32=True)
    assert peak == tf32 and "TF32" in source and name in source
    peak, source = gpu_peak(name, torch.float32, tf32=False)
    assert peak == fp32 and "TF32 off" in source


def test_unknown_gpus_have_no_datasheet_peak():
    for name in ("NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA H1000"):
        assert gpu_peak(name, torch.bfloat16) is None


def test_detected_peak_follows_the_tf32_setting(monkeypatch):
    """On a GPU the figure is the datasheet's, for the dtype the run uses: float32 matmuls count at the TF32 peak
    when torch runs them in TF32 (as pick_device sets up) and at the float32 one when not."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    cuda = torch.device("cuda", 0)
    assert detect_peak_tflops(cuda, torch.bfloat16)[0] == 756
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert detect_peak_tflops(cuda, torch.float32)[0] == 378
        torch.set_float32_matmul_precision("highest")
        assert detect_peak_tflops(cuda, torch.float32)[0] == 51
    finally:
        torch.set_float32_matmul_precision(before)


def test_cost_takes_a_gpu_variant(capsys):
    main(["cost", "--preset", "tiny", "--tokens", "1e9", "--device", "H100-PCIe"])
    assert "756 TFLOP/s / 40%" in capsys.readouterr().out
