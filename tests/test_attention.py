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


def test_sparse_absorbed_equals_expanded():
    """DeepSeek-V3.2's sparse attention: the absorbed form gathers each query's selected cache entries and gives
    the expanded form's (masked) result, for the whole sequence and for a decoding tail."""
    cfg = small_config(index_n_heads=8, index_head_dim=16, index_topk=8)
    attn = randomise(leanseek.Transformer(cfg), 1).layers[0].self_attn
    x = torch.randn(2, 24, cfg.hidden_size)
    rope = Rotary(cfg)(torch.arange(24))
    with torch.no_grad():
        expanded = attn(x, rope)
        kv = attn.cache_entry(x, rope)
        assert kv.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim
        assert (attn.forward_absorbed(x, rope, kv) - expanded).abs().max() < 1e-5
        assert (attn.forward_absorbed(x[:, -3:], rope[-3:], kv) - expanded[:, -3:]).abs().max() < 1e-5


def test_indexer_loss_is_the_kl_to_the_attention_and_trains_the_indexer_only():
    """MLA.index_kl against the report's definition written out here: the main attention's probabilities summed
    over heads and L1-normalised, KL to the softmax of the index scores over the keys attended to; its gradient
    reaches the indexer's weights and nothing else."""
    cfg = small_config(index_n_heads=4, index_head_dim=16, index_topk=8)
    attn = randomise(leanseek.Transformer(cfg), 3).layers[0].self_attn
    T = 20
    x = torch.randn(1, T, cfg.hidden_size, requires_grad=True)
    rope = Rotary(cfg)(torch.arange(T))
    for dense in (True, False):
        losses = []
        attn(x, rope, losses, dense=dense)
        with torch.no_grad():  # the reference: per-head attention weights from the layer's own projections
            q = attn.queries(x, rope)
            c_kv, k_pe = attn.latents(x, rope)
            k_nope = attn.kv_b_proj(c_kv).unflatten(-1, (cfg.num_attention_heads, -1))[..., :cfg.qk_nope_head_dim]
            k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, cfg.num_attention_heads, -1)], dim=-1)
            logits = torch.einsum("bthd,bshd->bhts", q, k) * attn.scale
            index = attn.indexer.scores(x, attn.query_latent(x), rope, attn.indexer.keys(x, rope))
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            keep = causal if dense else attn.indexer.select(index, causal)
            p = logits.masked_fill(~keep, float("-inf")).softmax(-1).sum(1)
            p = p / p.sum(-1, keepdim=True)
            log_q = index.masked_fill(~keep, float("-inf")).log_softmax(-1)
            want = sum(p[0, t, s] * (p[0, t, s].log() - log_q[0, t, s])
                       for t in range(T) for s in range(T) if keep[..., t, s].all() and p[0, t, s] > 0) / T
        assert losses[0].item() == pytest.approx(want.item(), rel=1e-4)
        if not dense:
            assert not torch.equal(keep, causal)  # the selection was sparse
    attn.zero_grad()
    x.grad = None
    losses[0].backward()
    learned = {n for n, p in attn.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learned and all(n.startswith("indexer.") for n in learned) and x.grad is None
