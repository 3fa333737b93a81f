"""Logit parity with transformers' own DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (eager attention, float32),
in both directions: leanseek loads what transformers writes, and transformers loads what leanseek writes."""

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


def check_both_directions(cfg, tmp_path, seed):
    ours = randomise(leanseek.Transformer(cfg), seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ours(ids)
    # leanseek -> transformers
    leanseek.save_hf(ours, tmp_path / "ours")
    theirs_logits, theirs = hf_logits(tmp_path / "ours", ids)
    assert type(theirs).__name__ == ("DeepseekV3ForCausalLM" if cfg.scoring_func == "sigmoid"
                                     else "DeepseekV2ForCausalLM")
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
