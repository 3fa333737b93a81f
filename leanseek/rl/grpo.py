"""The GRPO objective as pure functions (DeepSeekMath section 4.1; DeepSeek-R1 Eqs. 1-3), with the later fixes as
options: Dr. GRPO's unscaled advantages and constant normaliser, DAPO's clip-higher and token-level loss.

Semantics follow TRL's GRPOTrainer (huggingface/trl @ f2cd577, trl/trainer/grpo_trainer.py `_compute_loss`), so
results carry over; spec/grpo.md section 4 gives the golden vectors the tests check.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
MAX_LOG_RATIO = 20.0  # k3's exp(ref - logp) overflows float32 past ~88: clamp the log-ratio (TRL PR #6549)


def advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Outcome advantages [N] for rewards [N] laid out as consecutive groups of group_size completions of one
    prompt: reward minus its group's mean, divided by the group's standard deviation ("group", the paper), by the
    whole batch's ("batch"), or not at all ("none", Dr. GRPO). Standard deviations are Bessel-corrected, + 1e-4."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
    if rewards.dim() != 1 or len(rewards) % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        adv = adv / (grouped.std(-1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.float().std() + 1e-4)
    return adv.flatten()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, loss_type: str = "dapo", eps_low: float = 0.2, eps_high: float | None = None,
              beta: float = 0.0, tokens_in_batch: float | None = None) -> torch.Tensor:
    """The clipped policy-gradient loss with an optional k3 KL penalty, aggregated as loss_type says.

    logp, old_logp, ref_logp, mask: [N, L] (L = the longest completion); adv: [N]. Per token:
        -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1),
    r = exp(logp - old_logp). Aggregation over the mask M:
        grpo:    mean over sequences of sum_t / |o_i| (the paper; length-biased)
        bnpo:    sum / sum M
        dr_grpo: sum / (N L)
        dapo:    sum / tokens_in_batch (the active tokens of the whole accumulated batch; default: this one's)
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta:
        log_ratio = (ref_logp.float() - logp.float()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        per_token = per_token + beta * (torch.exp(log_ratio) - log_ratio - 1).to(per_token.dtype)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * mask.shape[1])
    return masked.sum() / (mask.sum().clamp(min=1) if tokens_in_batch is None else tokens_in_batch)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), in float32 with a clamped log-ratio (for logging)."""
    log_ratio = (ref_logp.float() - logp.float()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1
