import torch

from leanseek.model.norm import RMSNorm, _RMSNormFunction


def test_rmsnorm_matches_definition_and_gradients():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.rand(16, dtype=torch.float64, requires_grad=True) + 0.5
    y = _RMSNormFunction.apply(x, w, 1e-6)
    assert torch.allclose(y, w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), (x, w))
    # non-contiguous input, as the latent slice of kv_a_proj_with_mqa's output is
    wide = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: _RMSNormFunction.apply(t[:, :16], w, 1e-6), (wide, w))


def test_rmsnorm_bf16_follows_transformers_rounding():
    """Below float32: normalise in float32, cast to the input dtype, then multiply by the weight."""
    norm = RMSNorm(16).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16).to(torch.bfloat16)
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)
