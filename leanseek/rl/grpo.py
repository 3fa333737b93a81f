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
    if group_size < 2:  # a lone completion has no group to be compared with: its advantage is undefined
        raise ValueError(f"group_size={group_size}: advantages need groups of at least 2 completions per prompt")
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
              beta: float = 0.0, max_completion_length: int | None = None, batch_sequences: int | None = None,
              batch_tokens: float | None = None) -> torch.Tensor:
    """The clipped policy-gradient loss with an optional k3 KL penalty, aggregated as loss_type says.

    logp, old_logp, ref_logp, mask: [N, L] (any columns: the mask picks the completion tokens); adv: [N]. Per token:
        -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1),
    r = exp(logp - old_logp). Aggregation over the mask M, for a batch of B sequences with K active tokens:
        grpo:       sum over sequences of (sum_t / |o_i|), / B (the paper; length-biased)
        bnpo, dapo: sum / K
        dr_grpo:    sum / (B max_completion_length), a constant (the run's --max-new-tokens; TRL's
                    max_completion_length), whatever the lengths sampled
    B and K are this call's unless batch_sequences and batch_tokens give the whole batch's: then calls on parts
    of a batch (micro-batches) return terms that sum to the whole batch's loss, for every loss type. (TRL's bnpo
    counts only the local batch's tokens and divides by the accumulation steps; leanseek accumulates exactly, so
    on one process bnpo and dapo coincide.)
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' divides by max_completion_length (the run's --max-new-tokens): "
                         f"got {max_completion_length!r}")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta:
        per_token = per_token + beta * kl_k3(logp, ref_logp).to(per_token.dtype)
    masked = per_token * mask
    sequences = mask.shape[0] if batch_sequences is None else batch_sequences
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    if loss_type == "dr_grpo":
        return masked.sum() / (sequences * max_completion_length)
    return masked.sum() / (mask.sum().clamp(min=1) if batch_tokens is None else batch_tokens)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), in float32 or wider, with a clamped log-ratio."""
    dtype = torch.promote_types(logp.dtype, torch.float32)
    log_ratio = (ref_logp.to(dtype) - logp.to(dtype)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1
