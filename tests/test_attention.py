"""MLA: the absorbed form (attending over the cached latent) computes the same function as the expanded form."""

import pytest
import torch
from conftest import randomise, small_config, yarn

import leanseek
from leanseek.model.rope import Rotary, apply_rope, softmax_scale


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"rope_scaling": yarn(8.0, 16)}],
                         ids=["qlora", "no-qlora", "yarn"])
def test_absorbed_equals_expanded(overrides):
    cfg = small_config(**overrides)
    attn = randomise(leanseek.Transformer(cfg), 1).layers[0].self_attn
    x = torch.randn(2, 24, cfg.hidden_size)
    rope = Rotary(cfg)(torch.arange(24))
    with torch.no_grad():
        expanded = attn(x, rope)
        c_kv, k_pe = attn.latents(x, rope)
        kv = torch.cat([c_kv, k_pe], dim=-1)
        absorbed = attn.forward_absorbed(x, rope, kv)
        # decoding: the last 3 tokens attend over a cache holding all 24 positions
        tail = attn.forward_absorbed(x[:, -3:], rope[-3:], kv)
    assert (absorbed - expanded).abs().max() < 1e-5
    assert (tail - expanded[:, -3:]).abs().max() < 1e-5
    assert c_kv.shape[-1] + k_pe.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim  # what a cache holds


def test_rope_pairs_are_interleaved():
    """DeepSeek rotates (x0, x1), (x2, x3), ...: with only pair 0 non-zero, only dims 0 and 1 may change."""
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    angle = torch.tensor([0.5, 0.0, 0.0, 0.0])
    out = apply_rope(x, torch.polar(torch.ones(4), angle))
    assert torch.allclose(out[0, :2], torch.tensor([0.8775826, 0.4794255]))  # (cos 0.5, sin 0.5)
    assert out[0, 2:].abs().max() == 0


def test_yarn_softmax_scale_matches_v3_report():
    """V3: 1/sqrt(192) * (0.1 ln 40 + 1)^2 = 0.135234 (spec section 4.2); V2-Lite's mscale 0.707: 0.114721."""
    assert softmax_scale(leanseek.ModelConfig.preset("deepseek-v3")) == pytest.approx(0.135234, abs=1e-6)
    assert softmax_scale(leanseek.ModelConfig.preset("deepseek-v2-lite")) == pytest.approx(0.114721, abs=1e-6)
