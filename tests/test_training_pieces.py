"""The V3 training objective and load-balancing rules, on hand-made routing cases and against direct formulas."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, small_config

import leanseek
from leanseek.model.moe import Routing
from leanseek.train import (cross_entropy, expert_load, max_violation, sequence_balance_loss, training_loss,
                            update_correction_bias)
from leanseek.train import losses
from leanseek.train.losses import linear_cross_entropy


def routing_from_scores(scores: torch.Tensor, k: int) -> Routing:
    top = scores.topk(k, dim=-1)
    return Routing(top.values, top.indices, scores)


def test_balance_loss_perfectly_balanced_is_one():
    """4 experts, top-1, 4 tokens each going to a different expert with equal total affinity: f_i = 1 and
    P_i = 1/4, so sum_i f_i P_i = 1 (Eqs. 17-20)."""
    scores = torch.full((4, 4), 0.1) + 0.8 * torch.eye(4)
    assert sequence_balance_loss(routing_from_scores(scores, 1), batch=1, top_k=1).item() == pytest.approx(1.0)


def test_balance_loss_collapsed_routing():
    """Every token prefers expert 0 with s = [0.9, 0.1, 0.1, 0.1]: f = [4, 0, 0, 0] (E/(K T) x 4 tokens),
    P_0 = 0.9/1.2 = 0.75, so the loss is 4 x 0.75 = 3."""
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.1]]).repeat(4, 1)
    assert sequence_balance_loss(routing_from_scores(scores, 1), batch=1, top_k=1).item() == pytest.approx(3.0)


def test_balance_loss_is_per_sequence():
    """Two sequences each collapsed onto a different expert are balanced as a batch but not per sequence."""
    a = torch.tensor([[0.9, 0.1, 0.1, 0.1]]).repeat(4, 1)
    b = torch.tensor([[0.1, 0.9, 0.1, 0.1]]).repeat(4, 1)
    loss = sequence_balance_loss(routing_from_scores(torch.cat([a, b]), 1), batch=2, top_k=1)
    assert loss.item() == pytest.approx(3.0)


def test_bias_update_and_maxvio():
    cfg = small_config(n_routed_experts=4, n_group=1, topk_group=1)
    model = leanseek.Transformer(cfg)
    routers = model.routers()
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])  # loads: 4, 2, 1, 1 (mean 2)
    load = expert_load([Routing(torch.ones(4, 2), indices, torch.zeros(4, 4))] * len(routers), 4)
    assert load[0].tolist() == [4.0, 2.0, 1.0, 1.0]
    update_correction_bias(routers, load, gamma=0.001)
    for r in routers:
        assert r.e_score_correction_bias.tolist() == pytest.approx([-0.001, 0.0, 0.001, 0.001])
    assert max_violation(load)[0].item() == pytest.approx((4 - 2) / 2)
    with pytest.raises(ValueError, match="routers"):
        update_correction_bias(routers, load[:1], gamma=0.001)


def test_linear_cross_entropy_matches_pytorch():
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -100
    ours = linear_cross_entropy(h, w, t, chunk_elems=50 * 64)  # several chunks
    ours.backward(torch.tensor(2.0))
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    ref.backward(torch.tensor(2.0))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(grads[0], h.grad, atol=1e-6) and torch.allclose(grads[1], w.grad, atol=1e-6)
    # a frozen head (--train mtp) or frozen inputs: only the gradient asked for, the same values
    for frozen in (w, h):
        frozen.requires_grad_(False)
        learning = h if frozen is w else w
        h.grad = w.grad = None
        linear_cross_entropy(h, w, t, chunk_elems=50 * 64).backward(torch.tensor(2.0))
        assert torch.allclose(learning.grad, grads[0] if learning is h else grads[1], atol=1e-6)
        assert frozen.grad is None
        frozen.requires_grad_(True)


def test_linear_cross_entropy_skips_unlearned_rows(monkeypatch):
    """Rows without a target (SFT's prompts and padding) never reach the head; none at all gives a zero loss."""
    seen = []
    apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda h, *rest: seen.append(len(h)) or apply(h, *rest))
    h = torch.randn(2, 10, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.randint(0, 20, (2, 10))
    t[0, :6] = t[1, 3:] = -100
    linear_cross_entropy(h, w, t).backward()
    assert seen == [7] and h.grad[0, :6].abs().sum() == 0 and h.grad[0, 6:].abs().sum() > 0
    loss = linear_cross_entropy(h, w, torch.full((2, 10), -100))
    loss.backward()
    assert seen[-1] == 0 and loss.item() == 0


def test_training_loss_terms():
    """L = CE + lambda * MTP + alpha * balance, with the MTP module predicting two tokens ahead (Eqs. 21-25)."""
    cfg = small_config(num_nextn_predict_layers=1)
    model = randomise(leanseek.Transformer(cfg), 2).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    terms = training_loss(model, x, y, mtp_weight=0.3, balance_weight=0.01)
    assert terms.ce.item() == pytest.approx(cross_entropy(model(x), y).item(), abs=1e-5)
    out = model.forward_train(x)
    mtp_logits = model.lm_head(out.mtp_hidden[0])  # position i predicts token i + 2 = y[:, i + 1]
    assert terms.mtp.item() == pytest.approx(cross_entropy(mtp_logits, y[:, 1:]).item(), abs=1e-5)
    assert terms.loss.item() == pytest.approx((terms.ce + 0.3 * terms.mtp + 0.01 * terms.balance).item(), abs=1e-5)
    assert terms.load.shape == (len(model.routers()), cfg.n_routed_experts)
    assert terms.load.sum(1).tolist() == [2 * 16 * 2] * 2 + [2 * 15 * 2]  # tokens x top-k; MTP sees T-1
    terms.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # the gating weights are differentiable
    # without the main loss (--train mtp): the same MTP and balance terms, the total less the main CE
    alone = training_loss(model, x, y, mtp_weight=0.3, balance_weight=0.01, main=False)
    assert torch.isnan(alone.ce) and alone.mtp.item() == pytest.approx(terms.mtp.item(), abs=1e-6)
    assert alone.loss.item() == pytest.approx((terms.loss - terms.ce).item(), abs=1e-5)
