"""ModelConfig: validation messages, Hugging Face field names, presets, parameter and FLOP accounting."""

import pytest

import leanseek
from leanseek import ConfigError, ModelConfig


@pytest.mark.parametrize("overrides, field, rule", [
    (dict(n_routed_experts=10, n_group=4), "n_group=4", "divide n_routed_experts=10"),
    (dict(n_routed_experts=8, num_experts_per_tok=5, n_group=4, topk_group=1), "num_experts_per_tok=5",
     "1 x 2 = 2"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7", "even"),
    (dict(topk_group=9), "topk_group=9", "n_group=8"),
    (dict(scoring_func="softmax"), "topk_method='noaux_tc'", "scoring_func='sigmoid'"),
    (dict(n_routed_experts=8, n_group=8, topk_group=1, num_experts_per_tok=1), "n_group=8", "at least 2"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace=99", "num_hidden_layers=61"),
    (dict(hidden_size=0), "hidden_size=0", "positive"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling type 'linear'", "yarn"),
])
def test_validation_names_field_and_rule(overrides, field, rule):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**overrides)
    assert field in str(err.value) and rule in str(err.value)


def test_presets_reproduce_published_sizes():
    v3 = ModelConfig.preset("deepseek-v3").param_counts()
    assert v3.total == pytest.approx(671e9, rel=0.002)  # 671B total
    assert 36.5e9 < v3.active < 38e9  # "37B activated" (36.7B in README_WEIGHTS)
    assert v3.mtp == pytest.approx(11.5e9, rel=0.02)  # "11.5B unique" MTP parameters
    lite = ModelConfig.preset("deepseek-v2-lite").param_counts()
    assert lite.total == pytest.approx(15.7e9, rel=0.01)
    assert lite.active == pytest.approx(2.4e9, rel=0.03)  # 2.4B active
    assert ModelConfig.preset("moonlight-16b-a3b").param_counts().total == pytest.approx(16e9, rel=0.01)
    kimi = ModelConfig.preset("kimi-k2").param_counts()
    assert kimi.total == pytest.approx(1.03e12, rel=0.01) and kimi.active == pytest.approx(32e9, rel=0.02)
    assert 4e6 < ModelConfig.preset("tiny").param_counts().total < 7e6
    assert 50e6 < ModelConfig.preset("small").param_counts().total < 100e6


def test_param_counts_match_the_module():
    """The analytic count equals the parameters a built model really has."""
    for name in ("tiny", "small"):
        cfg = ModelConfig.preset(name)
        model = leanseek.Transformer(cfg)
        main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
        assert (main, mtp) == (cfg.param_counts().total, cfg.param_counts().mtp)


def test_flops_per_token():
    cfg = ModelConfig.preset("deepseek-v3")
    pc = cfg.param_counts()
    main_only = cfg.flops_per_token(4096, include_mtp=False)
    attention = 6 * 61 * 128 * (192 + 128) * 4096
    assert main_only == 6 * pc.active + attention
    assert cfg.flops_per_token(4096) > main_only  # the MTP module trains too
    assert cfg.flops_per_token(8192) - cfg.flops_per_token(4096) == 6 * 62 * 128 * 320 * 4096


def test_hf_round_trip_and_forms():
    cfg = ModelConfig.preset("deepseek-v3")
    hf = cfg.to_hf()
    assert hf["architectures"] == ["DeepseekV3ForCausalLM"] and hf["rope_scaling"]["mscale_all_dim"] == 1.0
    assert ModelConfig.from_hf(hf) == cfg
    # transformers >= 5 writes rope_parameters instead of rope_theta + rope_scaling
    modern = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    modern["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **{
        k: v for k, v in hf["rope_scaling"].items() if k != "type"}}
    assert ModelConfig.from_hf(modern) == cfg
    kimi = ModelConfig.preset("kimi-k2").to_hf() | {"model_type": "kimi_k2"}
    assert ModelConfig.from_hf(kimi) == ModelConfig.preset("kimi-k2")
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_hf(hf | {"model_type": "llama"})
    with pytest.raises(ConfigError, match="rope_interleave"):
        ModelConfig.from_hf(hf | {"rope_interleave": False})


def test_v2_config_keys():
    lite = ModelConfig.preset("deepseek-v2-lite")
    hf = lite.to_hf()
    assert hf["model_type"] == "deepseek_v2" and hf["architectures"] == ["DeepseekV2ForCausalLM"]
    assert ModelConfig.from_hf(hf) == lite
