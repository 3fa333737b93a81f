"""GRPO's advantages and loss against the golden vectors of spec/grpo.md section 4.4 (computed from TRL's formula),
and the trainer's micro-batched update against the one-batch one."""

import argparse

import pytest
import torch
from conftest import randomise, small_config

import leanseek
from leanseek.rl import advantages, grpo_loss
from leanseek.rl.trainer import Batch, accumulate, micro_batches, score

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
        got = grpo_loss(LOGP, OLD, REF, adv, MASK, loss_type=loss_type, eps_low=0.2, eps_high=eps_high, beta=beta,
                        max_completion_length=3)
        assert abs(float(got) - value) < 2e-6, (loss_type, float(got), value)
        # the same completions laid out as the trainer has them: after prompts of different lengths, padded to
        # the longest sequence, the mask covering only completion tokens; dr_grpo still divides by N x 3
        wide = [with_prompt_columns(x) for x in (LOGP, OLD, REF, MASK)]
        got = grpo_loss(*wide[:3], adv, wide[3], loss_type=loss_type, eps_low=0.2, eps_high=eps_high, beta=beta,
                        max_completion_length=3)
        assert abs(float(got) - value) < 2e-6, ("with prompt columns", loss_type, float(got), value)


PROMPT_LENGTHS = [2, 5, 1, 3, 4, 2, 6, 1]


def with_prompt_columns(x: torch.Tensor) -> torch.Tensor:
    """x [8, 3] shifted right by each row's prompt length into [8, 9]; around it zeros for the mask, noise for
    log-probabilities (which the mask must hide)."""
    out = torch.zeros(len(x), 9, dtype=x.dtype) if x is MASK else torch.randn(len(x), 9, dtype=x.dtype)
    for i, n in enumerate(PROMPT_LENGTHS):
        out[i, n:n + 3] = x[i]
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_losses_of_parts_sum_to_the_whole(loss_type):
    """Given the whole batch's sequence and token counts, the losses of any split of the rows sum to the whole
    batch's loss, and so do their gradients (what the trainer's micro-batches rely on)."""
    adv = advantages(REWARDS, 4, "group")
    kw = dict(loss_type=loss_type, beta=0.04, max_completion_length=3)
    logp = LOGP.double().requires_grad_()
    whole = grpo_loss(logp, OLD.double(), REF.double(), adv, MASK, **kw)
    (want,) = torch.autograd.grad(whole, logp)
    parts = [[0, 5], [1, 2, 3], [4], [6, 7]]
    total = sum(grpo_loss(logp[r], OLD.double()[r], REF.double()[r], adv[r], MASK[r], batch_sequences=8,
                          batch_tokens=MASK.sum(), **kw) for r in parts)
    (got,) = torch.autograd.grad(total, logp)
    assert abs(float(total - whole)) < 1e-12
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


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
    with pytest.raises(ValueError, match="group_size=1: advantages need groups of at least 2"):
        advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(LOGP, OLD, None, torch.zeros(8), MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
        grpo_loss(LOGP, OLD, None, torch.zeros(8), MASK, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batched_update_equals_one_batch(loss_type):
    """The policy update over micro-batches of a token budget (rows sorted by length, each cut to its longest)
    gives the loss, gradients and statistics of one pass over the whole batch, for every loss type.
    The old policy and the reference are other models, so ratios are clipped and the KL term is live."""
    vocab, pad = 61, 0
    policy, old, ref = (randomise(leanseek.Transformer(small_config(vocab_size=vocab)), seed=s).double().train()
                        for s in (1, 2, 3))
    g = torch.Generator().manual_seed(0)
    prompt = [3, 5, 2, 4, 6, 3, 2, 5, 4, 3]
    completion = [4, 1, 7, 2, 5, 3, 6, 1, 2, 7]
    T = max(p + c for p, c in zip(prompt, completion))
    ids = torch.full((10, T), pad)
    mask = torch.zeros(10, T - 1)
    for i, (p, c) in enumerate(zip(prompt, completion)):
        ids[i, :p + c] = torch.randint(1, vocab, (p + c,), generator=g)
        mask[i, p - 1:p + c - 1] = 1
    adv = torch.randn(10, generator=g, dtype=torch.float64) * 2
    batch = Batch(ids, mask.double(), torch.zeros(10), adv, {})
    args = argparse.Namespace(loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=0.04, temperature=0.9,
                              max_new_tokens=8)

    def update(budget):
        parts = micro_batches(batch, budget, "cpu")
        score(parts, old, ref, args.temperature)
        policy.zero_grad(set_to_none=True)
        totals = accumulate(policy, parts, args)
        return len(parts), totals, [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    n1, whole, want = update(10 * T)
    n2, split, got = update(24)
    assert n1 == 1 and n2 >= 4
    assert whole["clip_region"] > 0 and whole["kl"] > 0 and abs(float(whole["loss"])) > 1e-3
    for k in whole:
        assert abs(float(split[k] - whole[k])) < 1e-12, k
    assert len(got) == len(want)
    for a, b in zip(got, want):  # float64 but for the router, which keeps float32 by design (V3 section 3.3)
        assert (a - b).norm() <= 1e-6 * b.norm()
