"""DeepSeek-V4: logit parity with transformers' DeepseekV4ForCausalLM in both directions over random configs, the
config forms, the preset counts, the released FP8/FP4 formats, and greedy decoding over the compressed decode state
equal to full forwards."""

import json
import random

import pytest
import torch
from conftest import yarn
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import leanseek
from leanseek.infer.engine import Engine
from leanseek.model.dequant import E2M1, dequantize

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def v4_config(**overrides) -> leanseek.ModelConfig:
    fields = dict(vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, head_dim=16, qk_rope_head_dim=4, q_lora_rank=8, o_groups=2, o_lora_rank=8,
                  sliding_window=4, layer_types=[SWA, CSA, HCA], compress_rates={CSA: 2, HCA: 4},
                  mlp_layer_types=["hash_moe", "moe", "moe"], n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=0.5,
                  index_n_heads=16, index_head_dim=8, index_topk=2, hc_mult=2, max_position_embeddings=256,
                  num_nextn_predict_layers=0)
    fields.update(overrides)
    return leanseek.ModelConfig(**fields)


def randomise(model: leanseek.Transformer, seed: int) -> leanseek.Transformer:
    """Random weights everywhere (norms and mHC scales around 1, the routing bias too), large enough that
    attention, routing and the indexer's choices are sharp. (16 indexer heads: an exact tie among index scores,
    which transformers breaks by no fixed rule, is then unlikely.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.rsplit(".", 1)[-1] in ("scale", "hc_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for r in model.routers():
            if r.e_score_correction_bias is not None:
                r.e_score_correction_bias.copy_(torch.rand(r.e_score_correction_bias.shape, generator=g) * 0.5)
    return model.eval()


def random_v4_config(rng: random.Random) -> leanseek.ModelConfig:
    """Every attention type at least once, in any order; hash and score routing; windows and compression rates
    shorter and longer than the test's sequences."""
    layers = rng.choice([3, 4])
    types = [SWA, CSA, HCA] + [rng.choice([SWA, CSA, HCA]) for _ in range(layers - 3)]
    rng.shuffle(types)
    mlp = ["hash_moe", "moe"] + [rng.choice(["hash_moe", "moe"]) for _ in range(layers - 2)]
    rng.shuffle(mlp)
    heads, head_dim = rng.choice([2, 4]), rng.choice([16, 24])
    rope = rng.choice([4, 8])
    return v4_config(
        vocab_size=rng.choice([50, 64]), hidden_size=rng.choice([32, 48]), num_hidden_layers=layers,
        num_attention_heads=heads, head_dim=head_dim, qk_rope_head_dim=rope, q_lora_rank=rng.choice([8, 24]),
        o_groups=rng.choice([1, 2]), o_lora_rank=rng.choice([8, 12]), sliding_window=rng.choice([3, 8, 64]),
        layer_types=types, compress_rates={CSA: rng.choice([2, 3, 4]), HCA: rng.choice([4, 5, 16])},
        mlp_layer_types=mlp, n_routed_experts=rng.choice([4, 6]), num_experts_per_tok=rng.choice([1, 2, 3]),
        scoring_func=rng.choice(["sqrtsoftplus", "sigmoid"]), swiglu_limit=rng.choice([0.0, 0.5, 10.0]),
        index_head_dim=rng.choice([8, 12]), index_topk=rng.choice([1, 3, 64]), hc_mult=rng.choice([1, 2, 4]),
        hc_sinkhorn_iters=rng.choice([1, 5, 20]), routed_scaling_factor=rng.choice([1.0, 2.5]),
        rope_theta=rng.choice([10000.0, 500.0]), compress_rope_theta=rng.choice([160000.0, 1000.0]),
        rope_scaling=rng.choice([None, yarn(rng.choice([2.0, 16.0]), 16)]),
        num_nextn_predict_layers=rng.choice([0, 1]))


def check_both_directions(cfg: leanseek.ModelConfig, tmp_path, seed: int, lengths=(5, 41)) -> None:
    ours = randomise(leanseek.Transformer(cfg), seed)
    leanseek.save_hf(ours, tmp_path / "ours")
    theirs = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = leanseek.load_hf(tmp_path / "theirs")
    for T in lengths:
        ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed + T))
        with torch.no_grad():
            expected, got = ours(ids), theirs(ids, use_cache=False).logits
            assert (got - expected).abs().max() < 1e-4, (T, (got - expected).abs().max())  # leanseek -> HF
            assert (loaded(ids) - got).abs().max() < 1e-4, T  # HF's save_pretrained -> leanseek


@pytest.mark.parametrize("seed", range(5))
def test_random_v4_configs(seed, tmp_path, quiet):
    check_both_directions(random_v4_config(random.Random(seed)), tmp_path, seed)


def test_v4_selection_and_mixing_matter(quiet):
    """Guard against vacuous parity: the indexer's choice, the window, the sinks and the Sinkhorn projection each
    change the logits (so a leanseek that skipped one would fail the parity tests)."""
    cfg = v4_config(index_topk=1)
    model = randomise(leanseek.Transformer(cfg), 1)
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
        for change in (dict(index_topk=8), dict(sliding_window=64), dict(hc_sinkhorn_iters=1)):
            other = leanseek.Transformer(cfg.replace(**change))
            other.load_state_dict(model.state_dict())
            assert (other.eval()(ids) - base).abs().max() > 1e-3, change
        model.layers[0].self_attn.sinks.zero_()
        assert (model(ids) - base).abs().max() > 1e-3


def test_v4_mtp_round_trips(tmp_path, quiet):
    """transformers drops V4's MTP weights; leanseek writes them under DeepSeek's names and reads them back."""
    cfg = v4_config(num_nextn_predict_layers=1)
    model = randomise(leanseek.Transformer(cfg), 2)
    leanseek.save_hf(model, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {"mtp.0.e_proj.weight", "mtp.0.hc_head_fn", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias",
            "embed.weight", "head.weight", "layers.0.ffn.gate.tid2eid", "layers.1.attn.indexer.wq_b.weight",
            "layers.1.attn.indexer.compressor.ape", "layers.2.attn.compressor.wkv.weight"} <= names
    again = leanseek.load_hf(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    out, back = model.forward_train(ids), again.forward_train(ids)
    assert torch.equal(out.mtp_hidden[0], back.mtp_hidden[0])
    assert torch.equal(again.layers[0].mlp.gate.tid2eid, model.layers[0].mlp.gate.tid2eid)


def test_v4_presets_match_the_published_counts():
    """V4-Flash: 284B total, 13B activated; V4-Pro: 1.6T, 49B (the model cards; activated counts leave out the
    input embedding, a lookup, as V3's and V2-Lite's do). MTP modules are counted apart."""
    flash = leanseek.ModelConfig.preset("deepseek-v4-flash").param_counts()
    pro = leanseek.ModelConfig.preset("deepseek-v4-pro").param_counts()
    assert flash.total == pytest.approx(284e9, rel=0.005)
    assert flash.active == pytest.approx(13e9, rel=0.03)
    assert pro.total == pytest.approx(1.6e12, rel=0.03)
    assert pro.active == pytest.approx(49e9, rel=0.01)


@pytest.mark.parametrize("seed", range(3))
def test_v4_parameter_count_matches_transformers(seed, quiet):
    cfg = random_v4_config(random.Random(seed)).replace(num_nextn_predict_layers=0)
    theirs = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf()))
    assert cfg.param_counts().total == sum(p.numel() for p in theirs.parameters())
    assert cfg.param_counts().total == sum(p.numel() for p in leanseek.Transformer(cfg).parameters())


def test_v4_config_forms():
    """DeepSeek's released config.json form (compress_ratios with the MTP block's entry, num_hash_layers, top-level
    YaRN) reads as the preset; leanseek's config.json reads back the same, and transformers reads the same
    schedule from it."""
    flash = leanseek.ModelConfig.preset("deepseek-v4-flash")
    released = {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "vocab_size": 129280,
                "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
                "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
                "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
                "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
                "topk_method": "noaux_tc", "norm_topk_prob": True, "num_hash_layers": 3, "swiglu_limit": 10.0,
                "sliding_window": 128, "rope_theta": 10000, "compress_rope_theta": 160000,
                "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                                 "original_max_position_embeddings": 65536, "type": "yarn"},
                "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
                "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "num_nextn_predict_layers": 1,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
                "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "expert_dtype": "fp4",
                "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                        "weight_block_size": [128, 128], "activation_scheme": "dynamic"}}
    cfg = leanseek.ModelConfig.from_hf(released)
    assert cfg == flash
    hf = flash.to_hf()
    assert leanseek.ModelConfig.from_hf(json.loads(json.dumps(hf))) == flash
    assert hf["compress_ratios"] == released["compress_ratios"] and hf["num_hash_layers"] == 3
    theirs = DeepseekV4Config(**hf)
    assert theirs.layer_types == flash.layer_types and theirs.mlp_layer_types == flash.mlp_layer_types
    assert theirs.rope_parameters["compress"]["factor"] == 16 and theirs.qk_rope_head_dim == 64


@pytest.mark.parametrize("change, message", [
    (dict(layer_types=[SWA, CSA]), "layer_types"),
    (dict(layer_types=[SWA, "full_attention", HCA]), "full_attention"),
    (dict(o_groups=3), "o_groups"),
    (dict(n_shared_experts=2), "n_shared_experts"),
    (dict(qk_rope_head_dim=32), "qk_rope_head_dim"),
    (dict(compress_rates={CSA: 0, HCA: 4}), "compress_rates"),
])
def test_v4_config_refusals(change, message):
    with pytest.raises(leanseek.ConfigError, match=message):
        v4_config(**change)


def fp4_encode(values: torch.Tensor) -> torch.Tensor:
    """e2m1 values [rows, n] (each one of the format's 16) -> int8 [rows, n/2], the even element in the low nibble:
    the released format as its description gives it, written independently of leanseek's decoder."""
    codes = torch.tensor([E2M1.index(v) for v in values.flatten().tolist()]).view(values.shape[0], -1, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8).view(torch.int8)


def fp4_exponents(w: torch.Tensor) -> torch.Tensor:
    """Per 32 inputs of each row, a power of two k with every w / 2^k an e2m1 value."""
    groups = w.view(w.shape[0], -1, 32)
    exps = torch.zeros(groups.shape[:2], dtype=torch.long)
    for (i, j), group in zip(torch.cartesian_prod(*map(torch.arange, groups.shape[:2])).tolist(),
                             groups.flatten(0, 1)):
        exps[i, j] = next(k for k in range(-4, 4) if all(v in E2M1 for v in (group / 2.0 ** k).tolist()))
    return exps


def e8m0(exponents: torch.Tensor) -> torch.Tensor:
    """Powers of two 2^k -> UE8M0 bytes (k + 127), as float8_e8m0fnu."""
    return (exponents + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def test_fp4_and_ue8m0_dequantisation():
    """Bytes written by hand: 0x2F holds -6 (low nibble 0xF) then 1.0 (high nibble 0x2); scale byte 128 = 2.0,
    126 = 0.5; 32 inputs share a scale."""
    packed = torch.tensor([[0x2F] * 16 + [0x71] * 16], dtype=torch.uint8).view(torch.int8)  # one row of 64
    scale = torch.tensor([[128, 126]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    w = dequantize(packed, scale)
    assert w.shape == (1, 64)
    assert w[0, :32].tolist() == [-12.0, 2.0] * 16  # (-6, 1) x 2
    assert w[0, 32:].tolist() == [0.25, 3.0] * 16  # (0.5, 6) x 0.5
    fp8 = torch.full((130, 3), 1.5).to(torch.float8_e4m3fn)
    scales = e8m0(torch.tensor([[1], [-2]]))  # blocks of 128 rows: the last 2 rows in the second block
    assert dequantize(fp8, scales).tolist() == [[3.0] * 3] * 128 + [[0.375] * 3] * 2


def test_v4_loads_the_released_fp8_and_fp4_formats(tmp_path, quiet):
    """A V4 folder written as DeepSeek releases it (routed experts FP4 with a scale per 32 inputs, other linears
    FP8 e4m3 in 128 x 128 blocks, every scale UE8M0 `<module>.scale`) loads to exactly the weights it encodes."""
    cfg = v4_config(hidden_size=64, moe_intermediate_size=64)
    model = randomise(leanseek.Transformer(cfg), 3)
    g = torch.Generator().manual_seed(0)
    table = torch.tensor(E2M1)
    with torch.no_grad():  # weights the formats hold exactly
        for name, p in model.named_parameters():
            if ".experts." in name:
                codes = torch.randint(0, 16, p.shape, generator=g)
                p.copy_(table[codes] * 2.0 ** torch.randint(-3, 2, (*p.shape[:-1], p.shape[-1] // 32), generator=g)
                        .repeat_interleave(32, -1))
            elif name.endswith(("q_a_proj.weight", "o_b_proj.weight")):
                p.copy_((p * 8).to(torch.float8_e4m3fn).float() / 4)
    leanseek.save_hf(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantised = 0
    for name in list(tensors):
        w = tensors[name]
        if ".experts." in name:  # FP4: scale per 32, values in e2m1
            exps = fp4_exponents(w)
            tensors[name] = fp4_encode(w / (2.0 ** exps).repeat_interleave(32, -1))
            tensors[name.removesuffix(".weight") + ".scale"] = e8m0(exps)
            quantised += 1
        elif name.endswith(("attn.wq_a.weight", "attn.wo_b.weight")):  # FP8: one block, scale 1/4
            tensors[name] = (w * 4).to(torch.float8_e4m3fn)
            tensors[name.removesuffix(".weight") + ".scale"] = e8m0(torch.full((1, 1), -2))
            quantised += 1
    assert quantised > 2 * cfg.num_hidden_layers
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = leanseek.load_hf(tmp_path)
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("chunk", [7, 512])
def test_v4_engine_greedy_equals_full_forwards(chunk, quiet):
    """Batched, chunked prefill then batched decode over the compressed state, with requests of different lengths
    finishing at different times: every token is the argmax of a full forward over what came before, past the
    window, many compressed windows and the indexer's top-k."""
    cfg = v4_config(num_hidden_layers=4, layer_types=[CSA, SWA, HCA, CSA], compress_rates={CSA: 4, HCA: 8},
                    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], sliding_window=8, index_topk=3,
                    vocab_size=128, num_nextn_predict_layers=1)
    model = randomise(leanseek.Transformer(cfg), 4)
    engine = Engine(model, max_batch=3, max_len=96, prefill_chunk=chunk)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 19, 33, 2)]
    ids = [engine.submit(p, max_new_tokens=n, temperature=0.0) for p, n in zip(prompts, (40, 30, 50, 20))]
    outs = {i: [] for i in ids}
    while engine.pending:  # the fourth request waits for a slot
        for o in engine.step():
            outs[o.request] += o.tokens
    for prompt, out in zip(prompts, outs.values()):
        seq = prompt + out
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out
    assert engine.cache.bytes_per_token() == pytest.approx(4 * ((16 + 8) / 4 * 2 + 16 / 8))


def test_v4_engine_refusals(quiet):
    model = leanseek.Transformer(v4_config(num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="eagerly"):
        Engine(model, compile=True)
    with pytest.raises(ValueError, match="speculative"):
        Engine(model, max_len=64).generate([[1, 2]], max_new_tokens=2, speculative=True)


def test_v4_indexer_loss_trains_the_indexer_only(quiet):
    """The CSA indexer's KL loss reaches the indexer's weights and nothing else; the language-model loss cannot reach
    them (a top-k choice); a few steps on the KL loss alone bring it down."""
    cfg = v4_config(index_topk=2, layer_types=[SWA, CSA, HCA])
    model = randomise(leanseek.Transformer(cfg), 5).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    indexer = model.layers[1].self_attn.compressor.indexer
    mine = {id(p) for p in indexer.parameters()}
    params = list(model.parameters())

    def index_loss():
        losses = []
        out = model.forward_train(ids, mtp=False, index_losses=losses)
        assert len(losses) == 1
        return losses[0], out

    loss, out = index_loss()
    lm = model.lm_head(out.hidden).logsumexp(-1).mean()
    reached = [id(p) for p, g in zip(params, torch.autograd.grad(lm, params, allow_unused=True)) if g is not None]
    assert reached and not mine & set(reached)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert {id(p) for p, g in zip(params, grads) if g is not None and g.abs().sum() > 0} == mine
    first = loss.item()
    optimizer = torch.optim.Adam(indexer.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        index_loss()[0].backward()
        optimizer.step()
    assert 0 <= index_loss()[0].item() < 0.7 * first


def test_v4_cache_accounting_matches_the_engine():
    """`leanseek presets` / `info` count what the engine's compressed state holds per sequence; at 1M tokens V4-Pro
    caches about a tenth of what V3.2 does (the V4 report's figure)."""
    cfg = v4_config(num_hidden_layers=4, layer_types=[CSA, SWA, HCA, CSA], mlp_layer_types=["moe"] * 4)
    engine = Engine(leanseek.Transformer(cfg), max_batch=1, max_len=200)
    held = sum(t.numel() for t in engine.cache.windows) + sum(
        s.kv.numel() + s.gate.numel() + s.entries[:, :-1].numel() for states in engine.cache.compressors
        for s in states.values())
    assert cfg.kv_cache_values(200) == held
    pro, v32 = (leanseek.ModelConfig.preset(n) for n in ("deepseek-v4-pro", "deepseek-v3.2"))
    assert 0.09 < pro.kv_cache_values(1 << 20) / v32.kv_cache_values(1 << 20) < 0.13
