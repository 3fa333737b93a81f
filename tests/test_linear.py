"""Decode-step matrix products (leanseek.model.linear): in a compiled graph on a CPU, a product of at most ROWS rows
is traced as a broadcast multiply and a sum (inductor fuses and parallelises it); more rows, or eager code, keep
the library matmul. Both give F.linear's / matmul's values."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, small_config
from torch._dynamo.testing import CompileCounterWithBackend

import leanseek
from leanseek.model.linear import ROWS, Linear, matmul
from leanseek.model.rope import Rotary


def traced(fn, *args):
    """fn(*args) through torch.compile (no code generation): its value and the operators dynamo recorded."""
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    out = torch.compile(fn, backend=counter, fullgraph=True)(*args)
    return out, {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("rows", [1, ROWS, ROWS + 1, 64])
def test_linear_and_matmul_forms(rows):
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=True)
    x = torch.randn(rows, 24)
    with torch.no_grad():
        out, ops = traced(layer, x)
        assert torch.allclose(out, F.linear(x, layer.weight, layer.bias), atol=1e-5)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # eager: the library's exactly
        assert ("linear" in str(ops)) == (rows > ROWS)
        a, b = torch.randn(3, rows, 16), torch.randn(3, 16, 20)
        out, ops = traced(matmul, a, b)
        assert torch.allclose(out, a @ b, atol=1e-5)
        assert ("matmul" in str(ops)) == (rows > ROWS)


@pytest.mark.parametrize("tokens", [2, ROWS + 1])
def test_attention_products_count_tokens_not_heads(tokens):
    """Absorbed MLA's score and value products have tokens x heads rows, all reading the same cached entries: the
    form follows the tokens (a 2-token speculative step of 4 heads, 8 rows, traced as reductions; it went to the
    library's bmm, ~1.5 ms instead of ~0.8 a step of the tiny model)."""
    cfg = small_config()
    attn = randomise(leanseek.Transformer(cfg), 1).layers[0].self_attn
    rotary = Rotary(cfg)  # inside the compiled function, so that it gives the compiled (cos, sin) form
    x = torch.randn(1, 12, cfg.hidden_size)
    positions = torch.arange(12 - tokens, 12)

    def decode(x, kv, positions):
        return attn.forward_absorbed(x, rotary(positions), kv)

    with torch.no_grad():
        kv = attn.cache_entry(x, rotary(torch.arange(12)))
        out, ops = traced(decode, x[:, -tokens:].clone(), kv, positions)
        assert (out - decode(x[:, -tokens:], kv, positions)).abs().max() < 1e-5
    assert cfg.num_attention_heads * tokens > ROWS
    assert ("matmul" in str(ops) or "bmm" in str(ops)) == (tokens > ROWS)
