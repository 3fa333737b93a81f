"""Quantised inference (leanseek.infer.quantize) against references written from the formats' definitions: int8
weights per output channel with int8 activations per token, int4 weights in groups of 32 with a scale and an
offset; then whole models: close to float, and the engine decodes them exactly as their own full forward."""

import pytest
import torch
from conftest import randomise, small_config
from test_engine import reference_greedy

import leanseek
from leanseek import Engine
from leanseek.infer.quantize import GROUP, QuantExperts, QuantLinear, matmul, quantize_matrix, quantize_model


def int8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 by rows of x and of w, the product in float64."""
    def fake(t):
        scale = t.abs().amax(-1, keepdim=True) / 127
        return (t / scale).round().clamp(-127, 127) * scale
    return fake(x.double()) @ fake(w.double()).T


def int4_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each group of 32 inputs on 16 levels from its minimum to its maximum."""
    g = w.double().unflatten(-1, (-1, GROUP))
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (high - low) / 15
    return x.double() @ (((g - low) / step).round() * step + low).flatten(-2).T


@pytest.mark.parametrize("mode, reference", [("int8", int8_reference), ("int4", int4_reference)])
def test_matmul_is_the_formats_product(mode, reference):
    torch.manual_seed(0)
    x, w = torch.randn(5, 256), torch.randn(96, 256)
    q, params = quantize_matrix(w, mode)
    got = matmul(x, q, params, mode)
    ref = reference(x, w)
    assert (got.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    exact = x.double() @ w.double().T
    # and the quantisation error itself is what the format allows, not more
    assert (ref - exact).norm() / exact.norm() < {"int8": 0.02, "int4": 0.15}[mode]
    assert q.numel() * q.element_size() == w.numel() // {"int8": 1, "int4": 2}[mode]


def test_int8_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    x, w = torch.randn(7, 128), torch.randn(64, 128)
    q, params = quantize_matrix(w, "int8")
    batched = matmul(x, q, params, "int8")
    assert all(torch.equal(batched[i:i + 1], matmul(x[i:i + 1], q, params, "int8")) for i in range(len(x)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # every width a multiple of 32 (int4's groups) and 16 (its kernel's outputs), so that int4 is used throughout
    cfg = small_config(vocab_size=97, num_nextn_predict_layers=1, hidden_size=64, intermediate_size=64,
                       moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=16, v_head_dim=16)
    return randomise(leanseek.Transformer(cfg), seed=11)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantised_model_is_close_and_decodes_as_its_own_forward(model, mode):
    import copy

    quantised = quantize_model(copy.deepcopy(model), mode)
    modes = {name: m.mode for name, m in quantised.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}
    assert modes.pop("lm_head") == "int8" and set(modes.values()) == {mode}
    assert sum(name.endswith("experts") for name in modes) == 3  # two MoE layers and the MTP module's
    floats = [name for name, m in quantised.named_modules() if isinstance(m, torch.nn.Linear)]
    assert floats and all(name.endswith("kv_b_proj") for name in floats)  # read as W^UK, W^UV by absorbed MLA
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(ids).log_softmax(-1), quantised(ids).log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    assert kl < {"int8": 5e-3, "int4": 0.1}[mode]  # measured 0.0018 and 0.040 (this random model)
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7], [9] * 20]
    engine = Engine(quantised, max_batch=2, max_len=64)
    assert engine.generate(prompts, max_new_tokens=8) == [reference_greedy(quantised, p, 8) for p in prompts]
    assert engine.generate(prompts, max_new_tokens=8, speculative=True) == [reference_greedy(quantised, p, 8)
                                                                            for p in prompts]
    with pytest.raises(ValueError, match="quantised models decode eagerly"):
        Engine(quantised, compile=True)


def test_bad_modes_and_flags_are_named(model):
    from leanseek.cli import parser
    from leanseek.device import wants_compile

    with pytest.raises(ValueError, match="'int3' is not one of int8, int4"):
        quantize_model(model, "int3")
    for command in ("serve", "chat"):
        args = parser(command).parse_args([command, "run", "--quantize", "int4"])
        assert args.quantize == "int4" and not wants_compile(args, torch.device("cpu"))  # eager by default
        args = parser(command).parse_args([command, "run", "--quantize", "int8", "--compile"])
        with pytest.raises(SystemExit, match="--compile does not apply to --quantize"):
            wants_compile(args, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_quantised_equals_quantising_the_loaded_model(model, mode, tmp_path, monkeypatch):
    """load_hf(quantize=...) quantises module by module as tensors arrive, never holding the float model whole:
    the result is the model quantised after a float load, tensor for tensor."""
    import copy

    leanseek.save_hf(model, tmp_path)
    seen = []
    from leanseek.infer import quantize as q

    original = q._quantized

    def counting(m, child, name, mode):
        seen.append(sum(x.numel() for x in m.parameters() if not x.is_meta))  # float weights held so far
        return original(m, child, name, mode)

    monkeypatch.setattr(q, "_quantized", counting)
    streamed = leanseek.load_hf(tmp_path, quantize=mode)
    monkeypatch.undo()
    after = quantize_model(copy.deepcopy(model), mode)
    assert streamed.state_dict().keys() == after.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(streamed.state_dict().values(), after.state_dict().values()))
    floats = sum(x.numel() for x in model.parameters())
    assert max(seen) < 0.5 * floats  # the float weights in memory at any time: never most of the model
    # a bf16 folder (as releases are stored) is read as stored, each module brought to float32 as it is quantised
    leanseek.save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    streamed = leanseek.load_hf(tmp_path / "bf16", quantize=mode)
    after = quantize_model(leanseek.load_hf(tmp_path / "bf16"), mode)
    assert all(torch.equal(a, b) for a, b in zip(streamed.state_dict().values(), after.state_dict().values()))
    assert {p.dtype for p in streamed.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="CPU ones"):
        leanseek.load_hf(tmp_path, quantize=mode, device="meta")
