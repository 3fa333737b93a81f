"""A training step under bf16 autocast: the MoE gating stays in float32 (V3 report section 3.3), the rest runs in
bf16, and the loss and gradients stay close to the float32 ones."""

import torch
from conftest import randomise, small_config

import leanseek
from leanseek.model.moe import Router
from leanseek.train.losses import training_loss

# bf16 keeps 8 significant bits: rounding a value to it moves it by up to 2^-8 of itself. The loss is a mean over
# tokens of float32 cross-entropies whose inputs went through such roundings, so its error averages out well below
# one rounding step (measured: at most 4.3e-4 relative over four seeds, routing flips included).
BF16_ROUNDING = 2.0**-8


def test_training_step_under_bf16_autocast_routes_in_float32():
    cfg = small_config(num_nextn_predict_layers=1)
    model = randomise(leanseek.Transformer(cfg), 1).train()
    g = torch.Generator().manual_seed(1)
    ids, targets = (torch.randint(0, cfg.vocab_size, (4, 64), generator=g) for _ in range(2))
    full = training_loss(model, ids, targets).loss
    full.backward()
    full_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()

    seen = []  # (router, its input, its decision) for every router call of the bf16 step
    hooks = [r.register_forward_hook(lambda r, args, out: seen.append((r, args[0].detach(), out)))
             for r in model.routers()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = training_loss(model, ids, targets).loss
    for h in hooks:
        h.remove()
    assert len(seen) == 3  # two MoE layers and the MTP module's block

    for router, x, routing in seen:
        assert routing.scores.dtype == routing.weights.dtype == torch.float32
        assert router.e_score_correction_bias.dtype == torch.float32
        want = router(x.float())  # outside autocast: the float32 router on the same input
        assert torch.equal(routing.indices, want.indices)
        assert torch.equal(routing.scores, want.scores) and torch.equal(routing.weights, want.weights)

    assert abs(loss.item() - full.item()) <= BF16_ROUNDING * full.item()

    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grad).all()
    assert all(r.weight.grad.dtype == torch.float32 and r.weight.grad.abs().sum() > 0 for r in model.routers())
    # the same direction as float32's, up to bf16 noise and the few tokens whose experts differ (measured 0.998)
    assert torch.nn.functional.cosine_similarity(grad, full_grad, dim=0) > 0.95
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert training_loss(model, ids, targets).loss < full


def test_correction_bias_stays_float32_when_the_model_is_cast():
    router = Router(small_config())
    router.e_score_correction_bias.fill_(0.1234)  # not a bf16 value
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert (router.e_score_correction_bias == torch.tensor(0.1234)).all()
    assert router(torch.randn(5, router.weight.shape[1], dtype=torch.bfloat16)).scores.dtype == torch.float32
