"""GRPO's advantages and loss against the golden vectors of spec/grpo.md section 4.4 (computed from TRL's formula)."""

import pytest
import torch

from leanseek.rl import advantages, grpo_loss

REWARDS = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])  # two prompts x G=4; the second group has zero std
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
LOGP = torch.tensor([[.5, .4, .3], [.6, .9, .9], [.2, .7, .9], [.8, .5, .6],
                     [.5, .5, .5], [.9, .9, .9], [.3, .3, .9], [.7, .7, .7]]).log()
OLD = LOGP + torch.tensor([[0, .1, -.3], [.25, 0, 0], [0, -.1, 0], [.05, 0, .4]] + [[0, 0, 0]] * 4)
REF = LOGP + 0.2


def test_advantages_golden():
    a = advantages(REWARDS, 4, "group")
    assert torch.allclose(a, torch.tensor([1, -1, -1, 1, 0, 0, 0, 0]) * 0.865875, atol=1e-6)
    assert torch.allclose(advantages(REWARDS, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    batch = advantages(REWARDS, 4, "batch")
    assert torch.allclose(batch, advantages(REWARDS, 4, "none") / (REWARDS.std() + 1e-4))


@pytest.mark.parametrize("scale, beta, eps_high, want", [
    ("group", 0.0, None, {"grpo": -0.006084, "bnpo": -0.135712, "dapo": -0.135712, "dr_grpo": -0.101784}),
    ("group", 0.04, None, {"grpo": -0.005228, "bnpo": -0.134856, "dapo": -0.134856, "dr_grpo": -0.101142}),
    ("none", 0.0, None, {"grpo": -0.003513, "bnpo": -0.078367, "dapo": -0.078367, "dr_grpo": -0.058775}),
    ("group", 0.0, 0.28, {"grpo": -0.008970, "bnpo": -0.139561, "dapo": -0.139561, "dr_grpo": -0.104670}),
])
def test_loss_golden(scale, beta, eps_high, want):
    adv = advantages(REWARDS, 4, scale)
    for loss_type, value in want.items():
        got = grpo_loss(LOGP, OLD, REF, adv, MASK, loss_type=loss_type, eps_low=0.2, eps_high=eps_high, beta=beta)
        assert abs(float(got) - value) < 2e-6, (loss_type, float(got), value)


def test_zero_std_groups_give_zero_gradient_and_on_policy_gradient():
    """With mu = 1 (old = current) the grpo loss is 0 when group advantages sum to zero, yet its gradient is the
    policy gradient -A / |o_i| / N per token; the all-equal group gets none."""
    logp = LOGP.clone().requires_grad_()
    adv = advantages(REWARDS, 4, "group")
    loss = grpo_loss(logp, logp.detach(), None, adv, MASK, loss_type="grpo")
    assert abs(float(loss.detach())) < 1e-7
    loss.backward()
    want = -adv[:, None] / MASK.sum(-1, keepdim=True) / len(adv) * MASK
    assert torch.allclose(logp.grad, want, atol=1e-7)
    assert (logp.grad[4:] == 0).all()


def test_kl_gradient():
    """d/dlogp of beta k3 = beta (1 - pi_ref / pi) per token, over the N tokens for bnpo."""
    logp = LOGP.clone().requires_grad_()
    grpo_loss(logp, logp.detach(), REF, torch.zeros(8), MASK, loss_type="bnpo", beta=0.04).backward()
    want = 0.04 * (1 - torch.exp(REF - LOGP)) / MASK.sum() * MASK
    assert torch.allclose(logp.grad, want, atol=1e-7)


def test_advantages_stay_within_groups():
    """Shuffling the other groups does not change a group's advantages (Search-R1 #88's bug class)."""
    r = torch.tensor([3.0, 1, 2, 0, 5, 5, 9, 1, 0, 0, 1, 1])
    a = advantages(r, 4, "group")
    r2 = torch.cat([r[:4], r[8:], r[4:8]])
    a2 = advantages(r2, 4, "group")
    assert torch.equal(a[:4], a2[:4]) and torch.equal(a[4:8], a2[8:]) and torch.equal(a[8:], a2[4:8])
    assert torch.allclose(a.view(3, 4).sum(-1), torch.zeros(3), atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="groups of 3"):
        advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(LOGP, OLD, None, torch.zeros(8), MASK, loss_type="ppo")
