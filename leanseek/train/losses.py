"""The DeepSeek-V3 training objective: next-token cross-entropy + lambda * MTP loss (Eq. 25) + alpha * balance loss,
and with DeepSeek-V3.2's sparse attention the indexer's KL loss (its inputs detached: it trains the indexer only)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.transformer import Transformer
from .balance import expert_load, sequence_balance_loss

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 over targets != -100. logits [..., V], targets [...]."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h W^T, targets), computed a chunk of tokens at a time, never holding the [N, V] logits.

    The gradients are formed chunk by chunk during the forward (softmax - onehot is at hand there), so the
    backward only scales them. One reused [chunk, V] float32 buffer replaces the logits and their gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = h.device.type
        # run the matmuls in the autocast dtype if autocast is on (this function turns it off for its body)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            return _LinearCrossEntropy._run(ctx, h.to(dtype), h.dtype, weight, targets, chunk, dtype)

    @staticmethod
    def _run(ctx, h, h_dtype, weight, targets, chunk, dtype):
        w = weight.to(dtype)
        valid = targets != IGNORE_INDEX
        n = valid.sum().clamp_min(1)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen head (--train mtp): no grad_w
        want_grad = want_h or want_w
        grad_h = torch.empty_like(h, dtype=h_dtype) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        buf = torch.empty(min(chunk, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], chunk):
            hc, tc, mc = h[s:s + chunk], targets[s:s + chunk].clamp_min(0), valid[s:s + chunk]
            logits = buf[:len(hc)]
            if dtype == torch.float32:
                torch.mm(hc, w.t(), out=logits)
            else:
                logits.copy_(hc @ w.t())
            target_logit = logits.gather(1, tc[:, None])[:, 0]
            peak = logits.amax(-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: no [chunk, V] temporaries
            norm = probs.sum(-1, keepdim=True)
            total += ((norm.log() + peak).squeeze(1) - target_logit).mul_(mc).sum()
            if want_grad:
                g = probs.mul_((mc / n)[:, None] / norm)  # softmax / n on valid rows, then minus one-hot / n
                g[torch.arange(len(tc), device=g.device), tc] -= mc / n
                g = g.to(dtype)
                if want_h:
                    grad_h[s:s + chunk] = g @ w
                if want_w and dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                elif want_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out, None if grad_w is None else grad_w * grad_out, None,
                None)


@torch.compiler.disable  # a loop over chunks, run eagerly under --compile (dynamo would unroll it)
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_elems: int | None = None) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets) without materialising the logits. h [..., d], weight [V, d].

    chunk_elems: the logits held at once. By default 2**21 on a CPU (8 MiB of float32, within its caches) and 2**27
    on a GPU (512 MiB): an H200 given the CPU's [64, 32768] chunks ran 2,047 of them per step of 64 x 1,024 tokens,
    each a handful of small kernels, and the whole step reached 3% MFU."""
    if chunk_elems is None:
        chunk_elems = 2**21 if h.device.type == "cpu" else 2**27
    chunk = max(16, chunk_elems // weight.shape[0])
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    # Only the rows with a target go through the head: SFT learns the assistant's tokens alone (57% of the cpu
    # speedrun's), and the head is some 40% of the tiny model's FLOPs. The loss and gradients are the same.
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if len(rows) < len(targets):
        h, targets = h.index_select(0, rows), targets.index_select(0, rows)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)


@dataclass
class LossTerms:
    loss: torch.Tensor  # what to backpropagate
    ce: torch.Tensor  # main next-token loss
    mtp: torch.Tensor  # mean over depths of the MTP losses (before lambda)
    balance: torch.Tensor  # sequence-wise balance loss summed over routers (before alpha)
    index: torch.Tensor  # mean over layers of the sparse-attention indexers' KL losses (before its weight)
    load: torch.Tensor  # [n_routers, E] tokens per expert in this batch (for the bias update and MaxVio)


def training_loss(model: Transformer, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3,
                  balance_weight: float = 1e-4, index_weight: float = 0.0, dense: bool = False,
                  main: bool = True) -> LossTerms:
    """L = L_main + mtp_weight * (1/D) sum_k L^k_MTP (Eqs. 24-25) + balance_weight * sum_layers L_Bal (Eq. 17)
    + index_weight * the mean of the indexers' KL losses (sparse attention; MLA.index_kl).

    input_ids, targets: [B, T], targets[:, i] being the token after input_ids[:, i] (-100 to ignore).
    MTP depth k predicts targets[:, i + k] from position i. dense: sparse-attention layers attend densely (the
    indexer's warm-up, against the dense attention). main=False leaves L_main out (ce is NaN): with only the MTP
    modules learning (`--train mtp`) nothing it depends on learns, and it cost a tenth of such a step."""
    index_losses = [] if index_weight > 0 and model.cfg.has_indexer else None
    out = model.forward_train(input_ids, mtp=mtp_weight > 0, index_losses=index_losses, dense=dense)
    head = model.lm_head.weight
    zero = out.hidden.new_zeros((), dtype=torch.float32)
    ce = linear_cross_entropy(out.hidden, head, targets) if main else zero
    mtp = (sum(linear_cross_entropy(h, head, targets[:, k:]) for k, h in enumerate(out.mtp_hidden, start=1))
           / len(out.mtp_hidden)) if out.mtp_hidden else zero
    cfg, B = model.cfg, input_ids.shape[0]
    balance = (sum(sequence_balance_loss(r, B, cfg.num_experts_per_tok) for r in out.routing)
               if balance_weight > 0 and out.routing else zero)
    load = (expert_load(out.routing, cfg.n_routed_experts) if out.routing
            else torch.zeros(0, cfg.n_routed_experts))
    index = sum(index_losses) / len(index_losses) if index_losses else zero
    return LossTerms(ce + mtp_weight * mtp + balance_weight * balance + index_weight * index,
                     ce.detach() if main else torch.full_like(zero, float("nan")),
                     mtp.detach(), balance.detach(), index.detach(), load)
