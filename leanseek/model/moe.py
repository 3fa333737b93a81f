"""DeepSeekMoE, V3 report section 2.1.2, Eqs. 12-16: shared experts plus top-K of many fine-grained routed experts.

V3 routes with sigmoid affinities and a per-expert correction bias that only steers *which* experts are chosen
(auxiliary-loss-free balancing); the gating weights come from the unbiased affinities. V2 routes with a softmax.
Both can limit each token to the best `topk_group` of `n_group` expert groups (node-limited routing).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .mlp import SwiGLU


@dataclass
class Routing:
    """One MoE layer's routing decision for N tokens."""

    weights: torch.Tensor  # [N, K] gating values g_{i,t} (float32), routed_scaling_factor applied
    indices: torch.Tensor  # [N, K] chosen experts
    scores: torch.Tensor  # [N, E] affinities s_{i,t} before the bias (float32): sigmoid (V3) or softmax (V2)


# What sending tokens to one expert costs on a CPU (operator calls, index bookkeeping), in multiply-adds: below it,
# running every expert on every token is cheaper than dispatching (measured on a 2-core Xeon: dense wins below
# about 200 tokens for the tiny preset, 12 for small)
DISPATCH_MACS = 3_000_000


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))  # centroids e_i
        # b_i of Eq. 16: a buffer (not trained by the optimizer), kept in float32; see leanseek.train.balance.
        # V2's softmax routers have none.
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.scoring_func == "sigmoid" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, d] -> Routing. Logits in float32, as DeepSeek and transformers compute them."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        N, E, G = logits.shape[0], cfg.n_routed_experts, cfg.n_group
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()  # Eq. 15
            choice = scores + self.e_score_correction_bias  # Eq. 16: bias for selection only
            if G > 1:  # a group's score is the sum of its top-2 biased affinities
                group_scores = choice.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)
                choice = self._mask_groups(choice, group_scores, float("-inf"))
        else:
            scores = logits.softmax(dim=-1)
            choice = scores
            if cfg.topk_method == "group_limited_greedy":  # V2: a group's score is its best expert
                choice = self._mask_groups(choice, choice.view(N, G, E // G).amax(-1), 0.0)
        indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)  # g'_{i,t} = s_{i,t}: the unbiased affinity (Eq. 16)
        # DeepSeek-V2's own code also renormalises softmax weights when asked (transformers' V2 class never does;
        # V2 checkpoints set norm_topk_prob=false)
        if cfg.norm_topk_prob and (cfg.scoring_func == "sigmoid" or cfg.num_experts_per_tok > 1):
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # Eq. 13
        return Routing(weights * cfg.routed_scaling_factor, indices, scores)

    def _mask_groups(self, choice: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        N, G = group_scores.shape
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.cfg.topk_group, dim=-1).indices, True)
        return choice.masked_fill(~keep.repeat_interleave(choice.shape[1] // G, dim=1), fill)


class _GroupedSwiGLU(torch.autograd.Function):
    """sum_k g_k SwiGLU_{e_k}(x) for tokens grouped by expert, one pair of matmuls per expert that has tokens.

    Hand-written backward: gradients go straight into preallocated buffers (no per-expert autograd graph, no
    split/stack/zero-fill of full-size tensors), which roughly halves the overhead around the matmuls on CPU.
    Per-expert elementwise work stays per expert: its small tensors stay in cache, where one pass over all
    experts' rows at once measured slower."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, weights, token, counts):
        """x [N, d]; w_gate_up [E, 2Ie, d]; w_down [E, d, Ie]; weights, token [N*K] sorted by expert;
        counts: tokens per expert (a list)."""
        Ie = w_down.shape[-1]
        out = torch.zeros_like(x)
        pre = x.new_empty(len(token), 2 * Ie)  # gate/up pre-activations, kept for the backward
        for e, rows in _expert_rows(counts):
            te = token[rows]
            h = torch.mm(x.index_select(0, te), w_gate_up[e].t(), out=pre[rows])
            act = F.silu(h[:, :Ie]).mul_(h[:, Ie:]).mul_(weights[rows, None])
            out.index_add_(0, te, act @ w_down[e].t())
        ctx.counts = counts
        ctx.save_for_backward(x, w_gate_up, w_down, weights, token, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_gate_up, w_down, weights, token, pre = ctx.saved_tensors
        Ie = w_down.shape[-1]
        grad_x = torch.zeros_like(x)
        # every busy expert's slice is overwritten below; only idle experts need zeros
        grad_gu, grad_down = torch.empty_like(w_gate_up), torch.empty_like(w_down)
        idle = [e for e, n in enumerate(ctx.counts) if not n]
        grad_gu[idle], grad_down[idle] = 0.0, 0.0
        grad_w = torch.empty_like(weights)
        g_pre = pre.new_empty(pre.shape)
        for e, rows in _expert_rows(ctx.counts):
            te = token[rows]
            gate, up, g = pre[rows, :Ie], pre[rows, Ie:], weights[rows, None]
            sig = torch.sigmoid(gate)
            silu = gate * sig
            act = silu * up  # before the gating weight
            gy = grad_out.index_select(0, te)
            torch.mm(gy.t(), act * g, out=grad_down[e])
            g_act = gy @ w_down[e]
            grad_w[rows] = torch.linalg.vecdot(g_act, act)
            g_act.mul_(g)
            torch.mul(g_act, silu, out=g_pre[rows, Ie:])
            # d silu(z)/dz = sigmoid(z) + silu(z) (1 - sigmoid(z)), computed in place
            torch.mul(g_act, up, out=g_pre[rows, :Ie]).mul_(torch.rsub(sig, 1).mul_(silu).add_(sig))
            xe = x.index_select(0, te)
            torch.mm(g_pre[rows].t(), xe, out=grad_gu[e])
            grad_x.index_add_(0, te, g_pre[rows] @ w_gate_up[e])
        return grad_x, grad_gu, grad_down, grad_w, None, None


def _expert_rows(counts: list[int]):
    """(expert, slice of its rows in the expert-sorted order) for each expert that received tokens."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class Experts(nn.Module):
    """All routed experts' SwiGLU weights, stacked: gate_up_proj [E, 2 Ie, d] (gate rows first), down_proj [E, d, Ie].

    Tokens are sorted by expert and each expert runs one matmul over its own tokens; experts with no tokens do no
    work. (Checkpoints store one tensor set per expert; leanseek.model.hf converts.)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, Ie = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, Ie))

    def inference_path(self, n: int) -> str:
        """How forward runs n tokens without gradients: "gathered" (each (token, choice) pair's weights gathered),
        "dense" (every expert on every token, the unchosen ones weighted 0) or "grouped" (tokens sorted by
        expert, one pair of matmuls per busy expert). The first two have no data-dependent shapes, so
        torch.compile takes them whole."""
        E, d, Ie = self.down_proj.shape
        if n * self.top_k <= E:
            return "gathered"
        if n * (E - self.top_k) * 3 * Ie * d <= E * DISPATCH_MACS:
            return "dense"
        return "grouped"

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N, d] -> sum_k g_k Expert_{i_k}(x): [N, d]."""
        N, K = routing.indices.shape
        if not torch.is_grad_enabled():
            path = self.inference_path(N)
            if path != "grouped":
                return (self._gathered if path == "gathered" else self._dense)(x, routing)
        flat = routing.indices.flatten()
        order = flat.argsort(stable=True)
        counts = flat.bincount(minlength=self.gate_up_proj.shape[0]).tolist()
        # the token behind each (token, slot) pair, grouped by expert, and its gating weight
        token, weights = order // K, routing.weights.flatten()[order]
        dtype = torch.promote_types(x.dtype, self.gate_up_proj.dtype)  # autocast is off inside the function
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = _GroupedSwiGLU.apply(x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype),
                                       weights.to(dtype), token, counts)
        return out.to(x.dtype)


    def _gathered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Decoding a few tokens: gather each (token, choice)'s expert weights and run all of them as one batched
        matrix-vector product, a handful of operator calls instead of a pair of matmuls per expert (the gathered
        weights are at most all experts' once, as N*K <= E)."""
        N, K = routing.indices.shape
        Ie = self.down_proj.shape[-1]
        flat = routing.indices.flatten()
        xs = x.to(self.gate_up_proj.dtype).view(N, 1, -1, 1)
        h = torch.matmul(self.gate_up_proj.index_select(0, flat).view(N, K, 2 * Ie, -1), xs).view(N * K, 2 * Ie)
        act = F.silu(h[:, :Ie]).mul_(h[:, Ie:]).mul_(routing.weights.view(-1, 1).to(h.dtype))
        out = torch.matmul(self.down_proj.index_select(0, flat), act.unsqueeze(-1)).view(N, K, -1).sum(1)
        return out.to(x.dtype)


    def _dense(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every expert on every token, weighted by a dense [N, E] gate matrix (zero where not chosen): E/K times
        the multiply-adds, in four operator calls."""
        N = x.shape[0]
        E, d, Ie = self.down_proj.shape
        w = self.gate_up_proj
        gates = x.new_zeros(N, E, dtype=w.dtype).scatter_(1, routing.indices, routing.weights.to(w.dtype))
        h = (x.to(w.dtype) @ w.view(E * 2 * Ie, d).t()).view(N, E, 2 * Ie)
        act = F.silu(h[..., :Ie]).mul_(h[..., Ie:]).mul_(gates[..., None])  # [N, E, Ie]
        return torch.bmm(act.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0).to(x.dtype)


class MoE(nn.Module):
    """h'_t = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_{i,t} FFN^(r)_i(u_t) (Eq. 12; the residual u_t is the block's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.gate(flat)
        y = self.experts(flat, routing).view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, routing
