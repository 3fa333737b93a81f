"""DeepSeekMoE, V3 report section 2.1.2, Eqs. 12-16: shared experts plus top-K of many fine-grained routed experts.

V3 routes with sigmoid affinities and a per-expert correction bias that only steers *which* experts are chosen
(auxiliary-loss-free balancing); the gating weights come from the unbiased affinities. V2 routes with a softmax.
Both can limit each token to the best `topk_group` of `n_group` expert groups (node-limited routing).

DeepSeek-V4 (report section 2.1) scores with sqrt(softplus) instead of the sigmoid, routes without groups, and routes
its first layers by a fixed hash of the token id (a table tid2eid of K experts per vocabulary entry) instead of by
score; its experts clip the SwiGLU's pre-activations to +-swiglu_limit (the gate from above only).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import linear
from .mlp import SwiGLU, swiglu


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

# Off the CPU (not measured yet): the dense path does n multiply-adds per expert weight it reads, and once n*K > E
# every path reads all experts' weights; up to this many tokens its extra work should hide behind those reads
# (H100/H200: ~200-300 bf16 flops per byte) and its [n, E, 2 Ie] activations stay a fraction of the weights.
# Past it, the padded path's bounded padding costs less than E/K times the work.
ACCELERATOR_DENSE_TOKENS = 128


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))  # centroids e_i
        # b_i of Eq. 16: a buffer (not trained by the optimizer), kept in float32; see leanseek.train.balance.
        # V2's softmax routers and V4's hash routers have none.
        biased = not hashed and (cfg.v4 or cfg.scoring_func == "sigmoid")
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if biased else None
        self.register_buffer("e_score_correction_bias", bias)
        # V4's hash routing: the experts of each token id, fixed (a buffer, saved with the weights)
        table = torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long) if hashed else None
        self.register_buffer("tid2eid", table)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> Routing:
        """x [N, d] -> Routing, in float32 throughout (logits, affinities, bias, gates), as DeepSeek and transformers
        compute them. Autocast is off here: it would run the logits' matmul in bf16, whose ~4e-3 steps on the
        affinities are coarser than the bias's 1e-3 updates (the V3 report, section 3.3, keeps gating in full
        precision)."""
        with torch.autocast(x.device.type, enabled=False):
            if self.cfg.v4:
                return self._route_v4(x.float(), input_ids)
            return self._route(x.float())

    def _route_v4(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> Routing:
        """Scores by scoring_func (sqrt(softplus) in V4); experts by the hash table, or the top K biased scores;
        gates the chosen scores, normalised, times routed_scaling_factor."""
        cfg = self.cfg
        logits = linear(x, self.weight.float())
        if cfg.scoring_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        if self.tid2eid is not None:
            if input_ids is None:
                raise ValueError("a hash-routed MoE layer needs the token ids (input_ids)")
            indices = self.tid2eid[input_ids.reshape(-1)]
        else:
            indices = (scores + self.e_score_correction_bias).topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(weights * cfg.routed_scaling_factor, indices, scores)

    def _route(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits = linear(x, self.weight.float())
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

    def _apply(self, fn, recurse=True):
        """Module.to(dtype) casts every floating buffer; the correction bias keeps its float32 value instead (its
        1e-3 steps would be lost in bf16), moved to wherever the weight went."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

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
    def forward(ctx, x, w_gate_up, w_down, weights, token, counts, limit):
        """x [N, d]; w_gate_up [E, 2Ie, d]; w_down [E, d, Ie]; weights, token [N*K] sorted by expert;
        counts: tokens per expert (a list); limit: swiglu's clipping (0: none)."""
        Ie = w_down.shape[-1]
        out = torch.zeros_like(x)
        pre = x.new_empty(len(token), 2 * Ie)  # gate/up pre-activations, kept for the backward
        for e, rows in _expert_rows(counts):
            te = token[rows]
            h = torch.mm(x.index_select(0, te), w_gate_up[e].t(), out=pre[rows])
            act = swiglu(*h.chunk(2, dim=-1), limit).mul_(weights[rows, None])
            out.index_add_(0, te, act @ w_down[e].t())
        ctx.counts, ctx.limit = counts, limit
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
            if ctx.limit:  # clipped values pass no gradient
                L = ctx.limit
                gate_kept, up_kept = gate <= L, (up >= -L) & (up <= L)
                gate, up = gate.clamp(max=L), up.clamp(-L, L)
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
            if ctx.limit:
                g_pre[rows, :Ie] *= gate_kept
                g_pre[rows, Ie:] *= up_kept
            xe = x.index_select(0, te)
            torch.mm(g_pre[rows].t(), xe, out=grad_gu[e])
            grad_x.index_add_(0, te, g_pre[rows] @ w_gate_up[e])
        return grad_x, grad_gu, grad_down, grad_w, None, None, None


def sort_by_expert(routing: Routing, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The (token, choice) pairs grouped by expert: the token behind each pair, its gating weight, and each
    expert's count of pairs (read on the host: a device sync)."""
    K = routing.indices.shape[1]
    flat = routing.indices.flatten()
    order = flat.argsort(stable=True)
    return order // K, routing.weights.flatten()[order], flat.bincount(minlength=n_experts).tolist()


def _expert_rows(counts: list[int]):
    """(expert, slice of its rows in the expert-sorted order) for each expert that received tokens."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class Experts(nn.Module):
    """All routed experts' SwiGLU weights, stacked: gate_up_proj [E, 2 Ie, d] (gate rows first), down_proj [E, d, Ie].

    Four ways to run them, with the same result (checkpoints store one tensor set per expert; leanseek.model.hf
    converts):
    - "grouped": tokens sorted by expert, one pair of matmuls per expert that has tokens: no wasted work, and the
      path training takes (its backward is hand-written), but the host reads the token counts (a device sync)
      and the shapes depend on the routing;
    - "gathered": each (token, choice) pair's expert weights gathered, one batched matrix-vector product;
    - "dense": every expert on every token, the unchosen ones weighted 0 (E/K times the multiply-adds);
    - "padded": sorted by expert as "grouped", each expert's rows padded to whole blocks, one batched matmul.
    The last three have shapes fixed by the token count alone: no host sync, and torch.compile takes them whole.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, Ie = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.limit = cfg.num_experts_per_tok, cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, Ie))

    def inference_path(self, n: int, device_type: str | None = None) -> str:
        """The path forward takes for n tokens without gradients on a device of this type (default: where the
        weights are). Only "grouped" has data-dependent shapes, and it is never chosen off the CPU."""
        E, d, Ie = self.down_proj.shape
        if n * self.top_k <= E:  # the gathered weights are at most all experts' once
            return "gathered"
        if (device_type or self.down_proj.device.type) == "cpu":
            return "dense" if n * (E - self.top_k) * 3 * Ie * d <= E * DISPATCH_MACS else "grouped"
        return "dense" if n <= ACCELERATOR_DENSE_TOKENS else "padded"

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N, d] -> sum_k g_k Expert_{i_k}(x): [N, d]. Training takes the grouped path; inference the one
        inference_path picks for x's device."""
        path = "grouped" if torch.is_grad_enabled() else self.inference_path(x.shape[0], x.device.type)
        return self.run(x, routing, path)

    def run(self, x: torch.Tensor, routing: Routing, path: str) -> torch.Tensor:
        """forward along the given path (see the class docstring)."""
        run = {"grouped": self._grouped, "gathered": self._gathered, "dense": self._dense,
               "padded": self._padded}[path]
        # matmuls in autocast's dtype when it is on, else in the inputs' promoted dtype; autocast is then turned
        # off so that each path (and _GroupedSwiGLU's backward) works in that one dtype
        device = x.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(x.dtype, self.gate_up_proj.dtype))
        with torch.autocast(device, enabled=False):
            return run(x.to(dtype), routing).to(x.dtype)

    def _grouped(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        token, weights, counts = sort_by_expert(routing, self.gate_up_proj.shape[0])
        return _GroupedSwiGLU.apply(x, self.gate_up_proj.to(x.dtype), self.down_proj.to(x.dtype),
                                    weights.to(x.dtype), token, counts, self.limit)

    def _gathered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Decoding a few tokens: a handful of operator calls instead of a pair of matmuls per expert."""
        N, K = routing.indices.shape
        Ie = self.down_proj.shape[-1]
        flat = routing.indices.flatten()
        w_gate_up = self.gate_up_proj.index_select(0, flat).to(x.dtype).view(N, K, 2 * Ie, -1)
        h = torch.matmul(w_gate_up, x.view(N, 1, -1, 1)).view(N * K, 2 * Ie)
        act = swiglu(*h.chunk(2, dim=-1), self.limit).mul_(routing.weights.view(-1, 1).to(x.dtype))
        w_down = self.down_proj.index_select(0, flat).to(x.dtype)
        return torch.matmul(w_down, act.unsqueeze(-1)).view(N, K, -1).sum(1)

    def _dense(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """A dense [N, E] gate matrix (zero where not chosen) weights every expert's output: four operator calls."""
        N = x.shape[0]
        E, d, Ie = self.down_proj.shape
        gates = x.new_zeros(N, E).scatter_(1, routing.indices, routing.weights.to(x.dtype))
        h = (x @ self.gate_up_proj.to(x.dtype).view(E * 2 * Ie, d).t()).view(N, E, 2 * Ie)
        act = swiglu(*h.chunk(2, dim=-1), self.limit).mul_(gates[..., None])  # [N, E, Ie]
        return torch.bmm(act.transpose(0, 1), self.down_proj.to(x.dtype).transpose(1, 2)).sum(0)

    def _padded(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each expert's (token, choice) pairs in consecutive rows, padded with zero rows to a multiple of a block
        size set by N alone; every block belongs to one expert, whose weights it gathers. Blocks as large as the
        mean pairs per expert (rounded up to a power of two) keep both the blocks (at most about 2E: twice the
        layer's expert weights gathered) and the rows (at most about 3NK) bounded for any N."""
        N, K = routing.indices.shape
        E, d, Ie = self.down_proj.shape
        block = 1 << (-(-N * K // E) - 1).bit_length()
        n_blocks = -(-(N * K + E * (block - 1)) // block)
        flat = routing.indices.flatten()
        counts = torch.zeros(E, dtype=flat.dtype, device=x.device).index_add_(0, flat, torch.ones_like(flat))
        padded = (counts + block - 1) // block * block
        ends = padded.cumsum(0)
        # a pair's row: its expert's first row plus its rank among that expert's pairs (its place in the
        # expert-sorted order less the pairs of lower experts)
        place = torch.empty_like(flat).scatter_(0, flat.argsort(stable=True), torch.arange(N * K, device=x.device))
        row = (ends - padded)[flat] + place - (counts.cumsum(0) - counts)[flat]
        rows = x.new_zeros(n_blocks * block, d).index_copy_(0, row, x.repeat_interleave(K, dim=0))
        # blocks past the last expert's rows hold only zeros; any expert will do for them
        expert = torch.searchsorted(ends, torch.arange(n_blocks, device=x.device) * block, right=True)
        expert = expert.clamp_max_(E - 1)
        h = torch.bmm(rows.view(n_blocks, block, d), self.gate_up_proj.index_select(0, expert).to(x.dtype).mT)
        act = swiglu(*h.chunk(2, dim=-1), self.limit)
        y = torch.bmm(act, self.down_proj.index_select(0, expert).to(x.dtype).mT).view(-1, d)
        return (y.index_select(0, row).view(N, K, d) * routing.weights.to(x.dtype)[..., None]).sum(1)


class MoE(nn.Module):
    """h'_t = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_{i,t} FFN^(r)_i(u_t) (Eq. 12; the residual u_t is the block's)."""

    def __init__(self, cfg: ModelConfig, hashed: bool = False):
        super().__init__()
        self.gate = Router(cfg, hashed)
        self.experts = Experts(cfg)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size,
                                      cfg.swiglu_limit) if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """input_ids: the tokens behind x, which hash-routed layers (V4) route by."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.gate(flat, input_ids)
        y = self.experts(flat, routing).view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, routing
