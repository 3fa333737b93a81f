"""DeepSeekMoE routing and expert computation against direct, token-by-token definitions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, small_config

import leanseek
from leanseek.model import moe as moe_module
from leanseek.model.moe import MoE, Router, Routing


def test_correction_bias_changes_choice_not_weights():
    cfg = small_config(n_group=1, topk_group=1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    before = router(x)
    # a large bias on expert 5 makes every token choose it ...
    router.e_score_correction_bias[5] = 10.0
    after = router(x)
    assert (after.indices == 5).any(-1).all()
    assert not torch.equal(before.indices.sort(-1).values, after.indices.sort(-1).values)
    # ... but its gating weight is still the unbiased sigmoid affinity, renormalised over the chosen experts
    s = torch.sigmoid(x @ router.weight.T)
    w = s.gather(1, after.indices)
    assert torch.allclose(after.weights, w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    assert torch.allclose(after.scores, s)


def test_group_limited_routing_stays_in_best_groups():
    cfg = small_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    routing = router(torch.randn(200, cfg.hidden_size))
    choice = routing.scores + router.e_score_correction_bias
    group_score = choice.view(200, 4, 2).topk(2, dim=-1).values.sum(-1)  # top-2 sum per group
    best_groups = group_score.topk(2, dim=-1).indices
    chosen_groups = routing.indices // 2
    assert all(set(c.tolist()) <= set(b.tolist()) for c, b in zip(chosen_groups, best_groups))


def test_v2_softmax_routing():
    cfg = small_config(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                       norm_topk_prob=False, routed_scaling_factor=16.0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(10, cfg.hidden_size)
    routing = router(x)
    p = torch.softmax(x @ router.weight.T, -1)
    top = p.topk(2, -1)
    assert torch.equal(routing.indices, top.indices)
    assert torch.allclose(routing.weights, top.values * 16.0)
    assert router.e_score_correction_bias is None


@pytest.mark.parametrize("tokens, dispatch_macs, path", [(2, 3_000_000, "gathered"), (21, 3_000_000, "dense"),
                                                         (21, 0, "grouped")])
def test_moe_matches_token_by_token_definition(tokens, dispatch_macs, path, monkeypatch):
    """Eq. 12: shared experts plus the gated sum of each token's chosen experts, computed one token at a time;
    for each way the experts run at inference."""
    monkeypatch.setattr(moe_module, "DISPATCH_MACS", dispatch_macs)
    cfg = small_config(n_shared_experts=2)
    moe: MoE = randomise(leanseek.Transformer(cfg), 4).layers[1].mlp
    assert moe.experts.inference_path(tokens) == path
    x = torch.randn(1, tokens, cfg.hidden_size)
    with torch.no_grad():
        y, routing = moe(x)
        flat = x.reshape(-1, cfg.hidden_size)
        want = moe.shared_experts(flat)
        Ie = cfg.moe_intermediate_size
        for t in range(flat.shape[0]):
            for e, g in zip(routing.indices[t].tolist(), routing.weights[t]):
                gate, up = (moe.experts.gate_up_proj[e] @ flat[t]).split(Ie)
                want[t] += g * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
    assert torch.allclose(y.reshape(-1, cfg.hidden_size), want, atol=1e-6)


def _traced_whole(experts, path: str, scores: torch.Tensor):
    """experts.run along `path` under torch.compile(fullgraph=True), which refuses to trace a host sync (.tolist(),
    .item()) or a shape that depends on the data instead of splitting the graph."""
    torch._dynamo.reset()  # a fresh trace per case: past the recompile limit dynamo would run eagerly
    return torch.compile(lambda x, w, i: experts.run(x, Routing(w, i, scores), path), fullgraph=True,
                         backend="eager")


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("tokens, path", [(4, "gathered"), (128, "dense"), (129, "padded"), (700, "padded")])
def test_accelerator_paths_have_no_host_sync(tokens, path, skewed):
    """Off the CPU, inference (decoding, batched prefill) never takes the grouped path, whose token counts go to
    the host once per MoE layer: the path chosen for a CUDA device traces whole and gives the grouped result."""
    cfg = small_config()
    moe: MoE = randomise(leanseek.Transformer(cfg), 4).layers[1].mlp
    assert moe.experts.inference_path(tokens, "cuda") == path
    assert moe.experts.inference_path(tokens, "cpu") == moe.experts.inference_path(tokens)  # the weights' device
    x = torch.randn(tokens, cfg.hidden_size)
    with torch.no_grad():
        routing = moe.gate(x)
        if skewed:  # every token on experts 3 and 5: six experts idle, two with every pair
            routing = Routing(routing.weights, torch.tensor([[3, 5]]).expand(tokens, 2).contiguous(), routing.scores)
        got = _traced_whole(moe.experts, path, routing.scores)(x, routing.weights, routing.indices)
        assert torch.allclose(got, moe.experts.run(x, routing, "grouped"), atol=1e-6)


def test_grouped_path_syncs():
    """The check above can fail: the grouped path reads its token counts on the host."""
    cfg = small_config()
    moe: MoE = randomise(leanseek.Transformer(cfg), 4).layers[1].mlp
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        routing = moe.gate(x)
        with pytest.raises(RuntimeError):
            _traced_whole(moe.experts, "grouped", routing.scores)(x, routing.weights, routing.indices)


@pytest.mark.parametrize("limit", [0.0, 1.0])
def test_expert_gradients_and_idle_experts(limit):
    """Gradients of the grouped expert kernel match autograd through the per-token definition, in float64, also
    with V4's clipped SwiGLU (limit 1: many pre-activations clipped); an expert that received no tokens gets
    exactly zero gradient (it did no work)."""
    from leanseek.model.moe import _GroupedSwiGLU

    torch.manual_seed(0)
    N, K, E, d, Ie = 20, 2, 4, 6, 5
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    w_gu = torch.randn(E, 2 * Ie, d, dtype=torch.float64, requires_grad=True)
    w_d = torch.randn(E, d, Ie, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # expert E-1 is never chosen
    g = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = flat.bincount(minlength=E).tolist()

    def grouped(x, w_gu, w_d, g):
        return _GroupedSwiGLU.apply(x, w_gu, w_d, g.flatten()[order], order // K, counts, limit)

    assert torch.autograd.gradcheck(grouped, (x, w_gu, w_d, g))
    grouped(x, w_gu, w_d, g).sum().backward()
    assert w_gu.grad[E - 1].abs().max() == 0 and w_d.grad[E - 1].abs().max() == 0
