"""Hugging Face folder I/O: sharding, dtypes, FP8 release format, and errors that name what is wrong."""

import json

import pytest
import torch
from conftest import randomise, small_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import leanseek
from leanseek import CheckpointError


@pytest.fixture
def saved(tmp_path):
    model = randomise(leanseek.Transformer(small_config(num_nextn_predict_layers=1)), 5)
    return model, leanseek.save_hf(model, tmp_path / "ckpt")


def logits(model, seed=0):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_layout_on_disk(saved):
    model, path = saved
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    L = model.cfg.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # one tensor set per expert
    assert not any("gate_up_proj" in n for n in names)
    assert {f"model.layers.{L}.{n}" for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                              "shared_head.norm.weight", "shared_head.head.weight",
                                              "embed_tokens.weight")} <= names  # MTP at layer L
    config = json.loads((path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["model_type"] == "deepseek_v3"
    assert not list(path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_sharded_round_trip_bf16(saved, tmp_path):
    model, _ = saved
    path = leanseek.save_hf(model, tmp_path / "sharded", dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    loaded = leanseek.load_hf(path, dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.routers()[0].e_score_correction_bias.dtype == torch.float32
    assert torch.equal(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight.to(torch.bfloat16))
    # saving again, unsharded, into the same folder removes the old shards
    leanseek.save_hf(loaded, path)
    assert sorted(p.name for p in path.glob("model*")) == ["model.safetensors"]


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_errors_name_the_tensors(saved):
    _, path = saved
    rewrite(path, lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.layers.2.self_attn.kv_b_proj.weight"):
        leanseek.load_hf(path)
    rewrite(path, lambda t: t.update({"model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(3, 3),
                                      "model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError) as err:
        leanseek.load_hf(path)
    assert "unexpected (1): model.layers.9.extra.weight" in str(err.value)
    assert "wrong shape (1): model.layers.2.self_attn.kv_b_proj.weight (3, 3) (expected (80, 16))" in str(err.value)


def test_folder_errors(saved, tmp_path):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="model_type 'qwen2' is not supported"):
        leanseek.load_hf(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        leanseek.load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="never unpickles"):
        leanseek.load_hf(tmp_path / "empty")


def test_config_without_mtp_weights_loads_without_mtp(saved, tmp_path):
    model, path = saved
    L = model.cfg.num_hidden_layers
    rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{L}.")])
    with pytest.warns(UserWarning, match="no MTP weights"):
        loaded = leanseek.load_hf(path)
    assert loaded.cfg.num_nextn_predict_layers == 0
    assert torch.allclose(logits(loaded), logits(model))


def test_fp8_block_quantised_release_format(saved):
    """DeepSeek ships FP8 e4m3 weights with a float32 inverse scale per 128 x 128 block; load dequantises."""
    model, path = saved
    name = "model.layers.0.mlp.gate_proj.weight"  # [48, 32]: one partial block
    tensors = load_file(path / "model.safetensors")
    w = tensors[name]
    scale = w.abs().max() / 448.0
    tensors[name] = (w / scale).to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(config))
    loaded = leanseek.load_hf(path)
    assert (loaded.layers[0].mlp.gate_proj.weight - w).abs().max() <= w.abs().max() / 8  # e4m3: 3 mantissa bits
    assert "quantization_config" not in leanseek.save_hf(loaded, path.parent / "bf16").joinpath(
        "config.json").read_text()
