"""Logit parity with transformers' own DeepseekV3ForCausalLM / DeepseekV32ForCausalLM / DeepseekV2ForCausalLM
(eager attention, float32), in both directions: leanseek loads what transformers writes, and transformers loads what
leanseek writes."""

import pytest
import torch
import transformers
from conftest import randomise, small_config, yarn
from transformers import AutoModelForCausalLM

import leanseek

V3_CASES = {
    "qlora-yarn-groups": dict(rope_scaling=yarn()),
    "no-qlora": dict(q_lora_rank=None, n_shared_experts=2),
    "no-shared-all-moe": dict(n_shared_experts=0, first_k_dense_replace=0),
    "four-groups-keep-two": dict(n_group=4, topk_group=2, num_experts_per_tok=3, rope_scaling=yarn(8.0, 16)),
    "one-group-no-norm": dict(n_group=1, topk_group=1, norm_topk_prob=False, rms_norm_eps=1e-5),
    "mtp-tied": dict(num_nextn_predict_layers=1, tie_word_embeddings=True),
}
V2_CASES = {
    "greedy-yarn-mscale": dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None,
                               rope_scaling=yarn(mscale=0.707)),
    "group-limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2),
}


def v2(**overrides):
    return small_config(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, **overrides)


def hf_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


def check_both_directions(cfg, tmp_path, seed, length=40):
    ours = randomise(leanseek.Transformer(cfg), seed)
    ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ours(ids)
    # leanseek -> transformers
    leanseek.save_hf(ours, tmp_path / "ours")
    theirs_logits, theirs = hf_logits(tmp_path / "ours", ids)
    assert type(theirs).__name__ == {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                                     "deepseek_v2": "DeepseekV2ForCausalLM"}[cfg.model_type]
    assert (theirs_logits - expected).abs().max() < 1e-4, (theirs_logits - expected).abs().max()
    # transformers -> leanseek (its own save_pretrained layout and config form)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = leanseek.load_hf(tmp_path / "theirs")
    with torch.no_grad():
        assert (loaded(ids) - theirs_logits).abs().max() < 1e-4
    return ours, loaded


@pytest.mark.parametrize("case", V3_CASES)
def test_v3_parity(case, tmp_path, quiet):
    cfg = small_config(**V3_CASES[case])
    ours, loaded = check_both_directions(cfg, tmp_path, seed=len(case))
    if cfg.num_nextn_predict_layers:  # transformers drops MTP weights; leanseek round-trips them
        again = leanseek.load_hf(leanseek.save_hf(ours, tmp_path / "again"))
        assert torch.equal(again.mtp[0].eh_proj.weight, ours.mtp[0].eh_proj.weight)
        assert loaded.cfg.num_nextn_predict_layers == 0


@pytest.mark.parametrize("case", V2_CASES)
def test_v2_parity(case, tmp_path, quiet):
    check_both_directions(v2(**V2_CASES[case]), tmp_path, seed=len(case))


def test_group_limiting_matters(tmp_path, quiet):
    """Guard against a vacuous parity test: with topk_group < n_group, routing without the group limit differs."""
    cfg = small_config(n_group=4, topk_group=1, num_experts_per_tok=2)
    model = randomise(leanseek.Transformer(cfg), 3)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        limited = model(ids)
        for r in model.routers():
            r.cfg = cfg.replace(topk_group=4)
        unlimited = model(ids)
    assert (limited - unlimited).abs().max() > 1e-3


def test_transformers_version_pinned():
    major, minor = map(int, transformers.__version__.split(".")[:2])
    assert (major, minor) >= (5, 8)  # the -inf group mask and MTP layout the spec describes


def random_config(rng, v2_style: bool) -> leanseek.ModelConfig:
    n_group = rng.choice([1, 2, 4])
    per_group = rng.choice([2, 3, 4])
    topk_group = rng.randint(1, n_group)
    fields = dict(
        vocab_size=rng.choice([50, 64, 97]), hidden_size=rng.choice([32, 48, 64]),
        intermediate_size=rng.choice([24, 40]), moe_intermediate_size=rng.choice([8, 16]),
        num_hidden_layers=rng.choice([1, 2, 3]), num_attention_heads=rng.choice([2, 4]),
        q_lora_rank=rng.choice([None, 16, 40]), kv_lora_rank=rng.choice([8, 16, 24]),
        qk_nope_head_dim=rng.choice([4, 8, 12]), qk_rope_head_dim=rng.choice([2, 4, 8]),
        v_head_dim=rng.choice([4, 12, 16]), n_routed_experts=n_group * per_group,
        n_shared_experts=rng.choice([0, 1, 2]), n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=rng.randint(1, topk_group * per_group), first_k_dense_replace=rng.choice([0, 1]),
        routed_scaling_factor=rng.choice([1.0, 2.5]), max_position_embeddings=128,
        rope_theta=rng.choice([10000.0, 50000.0]),
        rope_scaling=rng.choice([None, yarn(rng.choice([2.0, 40.0]), 16, rng.choice([1.0, 0.707]))]),
    )
    if v2_style:
        fields.update(scoring_func="softmax", norm_topk_prob=False,
                      topk_method=rng.choice(["greedy", "group_limited_greedy"]))
    else:
        fields.update(norm_topk_prob=rng.choice([True, False]))
    return leanseek.ModelConfig(**fields)


@pytest.mark.parametrize("seed", range(6))
def test_random_configs(seed, tmp_path, quiet):
    import random

    rng = random.Random(seed)
    check_both_directions(random_config(rng, v2_style=seed % 3 == 2), tmp_path, seed)


# DeepSeek-V3.2: sparse attention selects once a sequence is longer than index_topk (40 tokens against 8 or 16)
V32_CASES = {
    "selects": dict(index_topk=16),
    "selects-yarn-mtp": dict(index_topk=8, rope_scaling=yarn(), num_nextn_predict_layers=1),
    "rope-is-the-whole-index-head": dict(index_topk=12, index_head_dim=6, index_n_heads=16),
    "all-moe-no-shared": dict(index_topk=10, first_k_dense_replace=0, n_shared_experts=0),
}


def v32(**overrides):
    return small_config(**{"index_n_heads": 8, "index_head_dim": 16, **overrides})


@pytest.mark.parametrize("case", V32_CASES)
def test_v32_parity(case, tmp_path, quiet):
    cfg = v32(**V32_CASES[case])
    ours, loaded = check_both_directions(cfg, tmp_path, seed=len(case))
    assert loaded.cfg.index_topk == cfg.index_topk and loaded.cfg.model_type == "deepseek_v32"
    if cfg.num_nextn_predict_layers:  # the MTP module's own indexer round-trips through leanseek's files
        again = leanseek.load_hf(leanseek.save_hf(ours, tmp_path / "again"))
        wk = [m.mtp[0].block.self_attn.indexer.wk.weight for m in (again, ours)]
        assert torch.equal(*wk)


def test_v32_parity_shorter_than_topk(tmp_path, quiet):
    """A sequence no longer than index_topk attends to every earlier token: the same logits as dense V3."""
    cfg = v32(index_topk=40)
    ours, _ = check_both_directions(cfg, tmp_path, seed=5, length=24)
    dense = leanseek.Transformer(cfg.replace(index_n_heads=0))
    dense.load_state_dict({k: v for k, v in ours.state_dict().items() if ".indexer." not in k})
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(dense.eval()(ids), ours(ids))


def test_sparse_selection_matters(quiet, monkeypatch):
    """Guard against a vacuous parity test: past index_topk, the logits differ from dense attention's, and from
    an indexer that rotates MLA's interleaved pairs instead of its own (x_i, x_i+d/2) pairs."""
    from leanseek.model import indexer, rope

    cfg = v32(index_topk=8)
    model = randomise(leanseek.Transformer(cfg), 2)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    dense = leanseek.Transformer(cfg.replace(index_n_heads=0))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    with torch.no_grad():
        sparse = model(ids)
        assert (dense.eval()(ids) - sparse).abs().max() > 1e-2
        monkeypatch.setattr(indexer, "apply_rope_halves", rope.apply_rope)
        assert (model(ids) - sparse).abs().max() > 1e-3


def test_v32_parameter_count_matches_transformers(quiet):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = v32(index_topk=8)
    theirs = DeepseekV32ForCausalLM(DeepseekV32Config(**{k: v for k, v in cfg.to_hf().items()
                                                            if k not in ("architectures", "model_type")}))
    assert sum(p.numel() for p in theirs.parameters()) == cfg.param_counts().total
    assert sum(p.numel() for p in leanseek.Transformer(cfg).parameters()) == cfg.param_counts().total


def test_v32_config_fields_and_refusals():
    cfg = leanseek.ModelConfig.from_hf({**small_config().to_hf(), "model_type": "deepseek_v32",
                                        "architectures": ["DeepseekV32ForCausalLM"]})
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)  # DeepseekV32Config's defaults
    assert cfg.to_hf()["model_type"] == "deepseek_v32" and "index_topk" not in small_config().to_hf()
    with pytest.raises(leanseek.ConfigError, match="q_lora_rank"):
        v32(q_lora_rank=None)
    with pytest.raises(leanseek.ConfigError, match="index_head_dim"):
        v32(index_head_dim=4)
    with pytest.raises(leanseek.ConfigError, match="mlp_layer_types"):
        leanseek.ModelConfig.from_hf({**v32().to_hf(), "mlp_layer_types": ["sparse", "dense", "sparse"]})
    with pytest.raises(leanseek.ConfigError, match="deepseek_v32"):
        leanseek.ModelConfig.from_hf({**small_config().to_hf(), "index_n_heads": 4})


def test_v32_flops_grow_with_index_topk_past_it():
    cfg = v32(index_topk=64)
    dense = cfg.replace(index_n_heads=0)
    per_key = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    indexer = 6 * cfg.num_hidden_layers * cfg.index_n_heads * cfg.index_head_dim
    base = cfg.flops_per_token(1) - per_key - indexer
    assert cfg.flops_per_token(32) == base + 32 * per_key + 32 * indexer
    assert cfg.flops_per_token(4096) == base + 64 * per_key + 4096 * indexer
    assert dense.flops_per_token(4096) - dense.flops_per_token(64) == (4096 - 64) * per_key
    kv = cfg.kv_cache_values_per_token()
    assert kv["indexer"] == cfg.num_hidden_layers * 16 and kv["mla"] == dense.kv_cache_values_per_token()["mla"] + \
        kv["indexer"]


@pytest.mark.parametrize("seed", range(4))
def test_random_v32_configs(seed, tmp_path, quiet):
    import random

    rng = random.Random(100 + seed)
    cfg = random_config(rng, v2_style=False)
    cfg = cfg.replace(q_lora_rank=cfg.q_lora_rank or 16, index_n_heads=rng.choice([4, 8, 16]),
                      index_head_dim=max(cfg.qk_rope_head_dim, rng.choice([8, 16])), index_topk=rng.choice([4, 16, 64]),
                      num_nextn_predict_layers=rng.choice([0, 1]))
    check_both_directions(cfg, tmp_path, seed, length=rng.choice([24, 40]))
