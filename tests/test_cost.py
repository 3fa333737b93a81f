import pytest

from leanseek import ModelConfig
from leanseek.cli import main
from leanseek.train.cost import DEEPSEEK_V3, CostEstimate


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
