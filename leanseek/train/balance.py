"""Expert load balancing, V3 report section 2.1.2.

- Auxiliary-loss-free (Eq. 16): each router's correction bias b_i moves by gamma towards balance after every
  optimizer step, from the expert loads of the whole global batch. No gradient; the bias only affects selection.
- Complementary sequence-wise balance loss (Eqs. 17-20), with a tiny weight alpha, against extreme imbalance
  inside single sequences.
- MaxVio, the imbalance measure of the report (and of Wang et al., "Auxiliary-Loss-Free Load Balancing").
"""

import torch

from ..model.moe import Router, Routing


def expert_load(routing: list[Routing], n_experts: int) -> torch.Tensor:
    """Tokens sent to each expert: [n_routers, E] (float32). Sum these over micro-batches (and all-reduce them over
    data-parallel ranks) to get the global batch's load before `update_correction_bias`."""
    return torch.stack([r.indices.flatten().bincount(minlength=n_experts).float() for r in routing])


@torch.no_grad()
def update_correction_bias(routers: list[Router], load: torch.Tensor, gamma: float) -> None:
    """b_i += gamma * sign(mean_load - load_i) for each router: overloaded experts become less attractive.

    load: [len(routers), E] from `expert_load`, over the global batch of one optimizer step."""
    if load.shape[0] != len(routers):
        raise ValueError(f"load has {load.shape[0]} rows but there are {len(routers)} routers")
    for router, row in zip(routers, load.to(torch.float32)):
        if router.tid2eid is not None:  # V4's hash routing: the table fixes the load, there is nothing to steer
            continue
        bias = router.e_score_correction_bias
        if bias is None:
            raise ValueError("auxiliary-loss-free balancing needs V3's sigmoid router (scoring_func='sigmoid'); "
                             "this router has no correction bias")
        bias += gamma * torch.sign(row.mean() - row).to(bias.device)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load, per router: [n_routers] (0 is perfect balance)."""
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.clamp_min(1e-9)


def sequence_balance_loss(routing: Routing, batch: int, top_k: int) -> torch.Tensor:
    """sum_i f_i P_i (Eq. 17), averaged over the `batch` sequences whose tokens `routing` covers (multiply by alpha).

    f_i = E / (K T) * (tokens of the sequence whose top-K affinities include expert i)   (Eq. 18)
    P_i = mean over the sequence of s'_{i,t}, with s' = s / sum_j s_j                   (Eqs. 19-20)
    The top-K is taken over the unbiased affinities, as Eq. 18 writes it."""
    scores = routing.scores.view(batch, -1, routing.scores.shape[-1])  # [B, T, E]
    B, T, E = scores.shape
    chosen = torch.zeros_like(scores).scatter_(-1, scores.topk(top_k, dim=-1).indices, 1.0)
    f = chosen.sum(1) * (E / (top_k * T))  # [B, E]; no gradient flows through the counts
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
    return (f * p).sum(-1).mean()
