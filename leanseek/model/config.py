"""ModelConfig: the DeepSeek-V3 hyper-parameters under Hugging Face's `DeepseekV3Config` field names,
DeepSeek-V3.2's sparse-attention indexer under `DeepseekV32Config`'s (index_n_heads > 0 makes a V3.2 model), and
DeepSeek-V4's under `DeepseekV4Config`'s (layer_types set makes a V4 model).

Using HF's names means a leanseek config *is* a `config.json` that transformers, vLLM, SGLang and llama.cpp's
converter read without translation. Presets are plain data in `presets.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .presets import PRESETS

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# config.json keys that transformers derives, or that no longer hold once leanseek holds the weights (it dequantises
# FP8 on load, and writes rope in DeepSeek's legacy form); never written back
DERIVED_HF_KEYS = {"architectures", "rope_parameters", "torch_dtype", "dtype", "num_mtp_layers", "head_dim",
                   "qk_head_dim", "transformers_version", "_name_or_path", "rope_interleave", "quantization_config",
                   "auto_map", "num_local_experts", "model_type", "mlp_layer_types", "layer_types", "expert_dtype",
                   "compress_ratios", "num_hash_layers", "partial_rotary_factor", "compress_rate_csa",
                   "compress_rate_hca", "num_key_value_heads"}
SCORING = {"noaux_tc": "sigmoid", "greedy": "softmax", "group_limited_greedy": "softmax"}
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_TYPES = ("hash_moe", "moe")
# DeepseekV4Config's defaults, for keys a deepseek_v4 config.json leaves out
V4_DEFAULTS = dict(vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
                   num_attention_heads=64, head_dim=512, q_lora_rank=1024, qk_rope_head_dim=64, num_experts_per_tok=6,
                   n_routed_experts=256, n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                   max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4,
                   hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8,
                   o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=512,
                   num_nextn_predict_layers=1)
V4_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
# the fields only a V4 model has, and those only V3-family models have (neither is written for the other)
V4_ONLY = ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "layer_types", "compress_rates",
           "compress_rope_theta", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "mlp_layer_types", "swiglu_limit")
V3_ONLY = ("intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_group", "topk_group",
           "first_k_dense_replace", "topk_method")


class ConfigError(ValueError):
    """A config field breaks a rule; the message names the field, its value and the rule."""


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter of the main model (embedding and head included), MTP excluded
    # parameters one token's matmuls use: all but the routed experts it was not sent to and the input embedding (a
    # lookup of one row), as DeepSeek's model cards count them (V3's 37B, V4-Flash's 13B)
    active: int
    mtp: int  # MTP modules' own parameters (embedding and head are shared, so not counted)
    mtp_active: int
    embedding: int  # input embedding (a lookup: no FLOPs)

    def __str__(self) -> str:
        return (f"total {human(self.total)}, active {human(self.active)}, "
                f"MTP {human(self.mtp)} (active {human(self.mtp_active)})")


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: queries are not compressed (V2-Lite, Moonlight)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" or "group_limited_greedy" (V2)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN, in DeepSeek's own config.json form
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0  # MTP depth D
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # DeepSeek Sparse Attention (V3.2): each query attends to the index_topk earlier tokens its lightning indexer
    # (index_n_heads heads of index_head_dim) scores best; 0 heads is V3's dense attention
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048
    # DeepSeek-V4 (layer_types not None): per layer, sliding-window attention over one shared KV head of head_dim,
    # plus compressed entries (CSA with an indexer, or HCA) at compress_rates; a grouped low-rank output projection;
    # hc_mult residual streams mixed by mHC; hash-routed MoE layers (mlp_layer_types); clipped SwiGLU
    head_dim: int = 512
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: list[str] | None = None
    compress_rates: dict[str, int] | None = None
    compress_rope_theta: float = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] | None = None
    swiglu_limit: float = 0.0  # 0: no clipping (V3)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # other HF keys, kept on save

    def __post_init__(self):
        if self.q_lora_rank == 0:  # DeepSeek's own ModelArgs spell "no query compression" as 0
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            self.rope_scaling = normalise_rope_scaling(self.rope_scaling)
        if self.v4:
            if not isinstance(self.layer_types, (list, tuple)):
                raise ConfigError(f"layer_types={self.layer_types!r}: must be a list, one entry per layer")
            self.layer_types = list(self.layer_types)
            self.compress_rates = {**V4_RATES, **(self.compress_rates or {})}
            if self.mlp_layer_types is None:  # DeepseekV4Config's default: the first 3 layers hash-routed
                n = self.num_hidden_layers
                self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
            self.mlp_layer_types = list(self.mlp_layer_types)
        self.validate()

    # ---------------------------------------------------------------- construction

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face config.json dict (deepseek_v3, deepseek_v32, deepseek_v2 or kimi_k2)."""
        hf = dict(hf)
        model_type = hf.pop("model_type", "deepseek_v3")
        if model_type == "deepseek_v4":
            return cls._from_hf_v4(hf)
        if model_type not in ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2"):
            raise ConfigError(f"model_type {model_type!r} is not supported: leanseek reads deepseek_v4, deepseek_v3, "
                              "deepseek_v32, deepseek_v2 and kimi_k2 checkpoints")
        if model_type == "deepseek_v32":  # DeepseekV32Config's defaults, where the file leaves them out
            hf = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, **hf}
            dense = min(hf.get("first_k_dense_replace", 3), hf.get("num_hidden_layers", 61))
            pattern = ["dense"] * dense + ["sparse"] * (hf.get("num_hidden_layers", 61) - dense)
            if hf.get("mlp_layer_types") not in (None, pattern):
                raise ConfigError(f"mlp_layer_types={hf['mlp_layer_types']!r}: leanseek supports only dense layers "
                                  f"first (first_k_dense_replace={dense}), i.e. {pattern!r}")
        elif hf.get("index_n_heads"):
            raise ConfigError(f"index_n_heads={hf['index_n_heads']} with model_type {model_type!r}: sparse attention "
                              "is DeepSeek-V3.2's (model_type deepseek_v32)")
        if hf.get("text_config"):
            raise ConfigError("config.json wraps the model in text_config (a multimodal checkpoint); "
                              "pass the text_config folder's language model instead")
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("moe_layer_freq", 1),
                          ("rope_interleave", True)):
            if key in hf and hf[key] != want:
                raise ConfigError(f"{key}={hf[key]!r} is not supported (only {want!r})")
        heads = hf.get("num_attention_heads")
        if hf.get("num_key_value_heads") not in (None, heads):
            raise ConfigError(f"num_key_value_heads={hf['num_key_value_heads']} must equal num_attention_heads={heads}"
                              " (MLA shares one latent across all heads)")
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            hf["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        rope = hf.pop("rope_parameters", None)  # transformers >= 5 form
        if rope and "rope_scaling" not in hf:
            hf.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if model_type == "deepseek_v2":
            hf.setdefault("scoring_func", "softmax")
            hf.setdefault("topk_method", "greedy")
            hf.setdefault("norm_topk_prob", False)
        else:  # transformers' V3 class always routes with sigmoid + bias, whatever these keys say
            hf["scoring_func"], hf["topk_method"] = "sigmoid", "noaux_tc"
        return cls._from_fields(hf, {f.name for f in dataclasses.fields(cls)} - {"extra", *V4_ONLY})

    @classmethod
    def _from_fields(cls, hf: dict[str, Any], names: set[str]) -> "ModelConfig":
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(hf.get(key), list):
                hf[key] = hf[key][0]
        known = {k: v for k, v in hf.items() if k in names}
        return cls(**known, extra={k: v for k, v in hf.items() if k not in names})

    @classmethod
    def _from_hf_v4(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From a deepseek_v4 config.json, in transformers' form (layer_types, compress_rates, mlp_layer_types,
        nested rope_parameters) or DeepSeek's release form (compress_ratios, num_hash_layers, rope_scaling),
        defaults as DeepseekV4Config's."""
        hf = {**V4_DEFAULTS, **hf}
        n = hf["num_hidden_layers"]
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("num_key_value_heads", 1), ("n_shared_experts", 1)):
            if key in hf and hf[key] != want:
                raise ConfigError(f"{key}={hf[key]!r} is not supported for deepseek_v4 (only {want!r})")
        rates = dict(hf.get("compress_rates") or V4_RATES)
        for kind, key in (("compressed_sparse_attention", "compress_rate_csa"),
                          ("heavily_compressed_attention", "compress_rate_hca")):
            if key in hf:
                rates[kind] = hf[key]
        hf["compress_rates"] = rates
        if hf.get("layer_types") is None and hf.get("compress_ratios") is not None:
            by_rate = {0: "sliding_attention", **{rate: kind for kind, rate in rates.items()}}
            bad = [r for r in hf["compress_ratios"] if r not in by_rate]
            if bad:
                raise ConfigError(f"compress_ratios has {bad[0]!r}: each entry must be 0 (sliding window only) or "
                                  f"one of the compress_rates {rates}")
            hf["layer_types"] = [by_rate[r] for r in hf["compress_ratios"][:n]]  # an extra last entry: the MTP's
        if hf.get("layer_types") is None:  # DeepseekV4Config's default: 2 HCA, then CSA and HCA alternating
            hf["layer_types"] = (["heavily_compressed_attention"] * min(n, 2)
                                 + ["heavily_compressed_attention", "compressed_sparse_attention"] * n)[:n]
        if hf.get("mlp_layer_types") is None and "num_hash_layers" in hf:
            k = hf["num_hash_layers"]
            hf["mlp_layer_types"] = ["hash_moe"] * min(n, k) + ["moe"] * max(0, n - k)
        if hf.get("partial_rotary_factor") is not None:
            hf["qk_rope_head_dim"] = int(hf["head_dim"] * hf["partial_rotary_factor"])
        rope = hf.pop("rope_parameters", None) or {}
        if isinstance(rope.get("main"), dict):
            hf["rope_theta"] = rope["main"].get("rope_theta", hf["rope_theta"])
            rope = rope.get("compress") or {}
            hf["compress_rope_theta"] = rope.get("rope_theta", hf["compress_rope_theta"])
        if rope.get("rope_type", rope.get("type", "default")) != "default" and not hf.get("rope_scaling"):
            hf["rope_scaling"] = {k: v for k, v in rope.items()
                                  if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")}
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            hf["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        return cls._from_fields(hf, {f.name for f in dataclasses.fields(cls)} - {"extra", *V3_ONLY})

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek-V3.2's DSA: a lightning indexer picks the keys each query attends to (V4's indexer picks
        compressed entries instead: see layer_types)."""
        return self.index_n_heads > 0 and not self.v4

    @property
    def has_indexer(self) -> bool:
        """A lightning indexer picks what attention reads: V3.2's tokens, or V4's compressed entries (CSA)."""
        return self.sparse_attention or (self.v4 and "compressed_sparse_attention" in self.layer_types)

    @property
    def v4(self) -> bool:
        """A DeepSeek-V4 model (hybrid compressed attention, mHC, hash routing)."""
        return self.layer_types is not None

    @property
    def model_type(self) -> str:
        if self.v4:
            return "deepseek_v4"
        if self.sparse_attention:
            return "deepseek_v32"
        return "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2"

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers, vLLM and SGLang read (legacy rope form, as DeepSeek's own config)."""
        if self.v4:
            return self._to_hf_v4()
        arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                "deepseek_v2": "DeepseekV2ForCausalLM"}[self.model_type]
        out = {k: v for k, v in self.extra.items() if k not in DERIVED_HF_KEYS}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("extra", *V4_ONLY)})
        if not self.sparse_attention:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                del out[name]
        out.update(architectures=[arch], model_type=self.model_type, num_key_value_heads=self.num_attention_heads,
                   hidden_act="silu", attention_bias=False, attention_dropout=0.0, moe_layer_freq=1,
                   use_cache=True, pretraining_tp=1)
        return out

    def _to_hf_v4(self) -> dict[str, Any]:
        """transformers' DeepseekV4Config form, plus the keys of DeepSeek's released config.json that say the same
        (compress_ratios with the MTP block's entry last, num_hash_layers, qk_rope_head_dim) for readers of that."""
        out = {k: v for k, v in self.extra.items() if k not in DERIVED_HF_KEYS}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("extra", "rope_scaling", *V3_ONLY)})
        factor = self.qk_rope_head_dim / self.head_dim
        compress = {"rope_type": "default"}
        if self.rope_scaling is not None:  # DeepSeek's V4 code never scales cos/sin: attention_factor 1
            compress = {"rope_type": "yarn", **{k: v for k, v in self.rope_scaling.items() if k != "type"},
                        "attention_factor": 1.0}
        ratios = [self.compress_rates.get(t, 0) for t in self.layer_types] + [0] * self.num_nextn_predict_layers
        out.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", num_key_value_heads=1,
                   hidden_act="silu", attention_bias=False, attention_dropout=0.0, use_cache=True,
                   partial_rotary_factor=factor, compress_ratios=ratios,
                   rope_parameters={"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                             "partial_rotary_factor": factor},
                                    "compress": {**compress, "rope_theta": self.compress_rope_theta,
                                                 "partial_rotary_factor": factor}})
        hashed = self.mlp_layer_types.count("hash_moe")
        if self.mlp_layer_types == ["hash_moe"] * hashed + ["moe"] * (self.num_hidden_layers - hashed):
            out["num_hash_layers"] = hashed
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- validation

    def validate(self) -> None:
        def fail(field_name: str, rule: str):
            raise ConfigError(f"{field_name}={getattr(self, field_name)!r}: {rule}")

        shape = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "qk_rope_head_dim",
                 "max_position_embeddings")
        for name in shape + (("head_dim", "o_groups", "o_lora_rank", "sliding_window", "q_lora_rank",
                               "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "hc_mult",
                               "hc_sinkhorn_iters") if self.v4 else ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0):
            fail("q_lora_rank", "must be a positive integer, or None for no query compression")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        if self.v4:
            return self._validate_v4(fail)
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be between 0 and num_hidden_layers={self.num_hidden_layers}")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            fail("intermediate_size", "must be positive when there are dense layers (first_k_dense_replace > 0)")
        if self.has_moe:
            self._validate_moe(fail)
        if not isinstance(self.index_n_heads, int) or self.index_n_heads < 0:
            fail("index_n_heads", "must be a non-negative integer (0: dense attention)")
        if self.sparse_attention:
            self._validate_indexer(fail)
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs["factor"] < 1:
                raise ConfigError(f"rope_scaling.factor={rs['factor']}: must be >= 1")
            if rs["beta_fast"] < rs["beta_slow"]:
                raise ConfigError(f"rope_scaling.beta_fast={rs['beta_fast']} must be >= "
                                  f"rope_scaling.beta_slow={rs['beta_slow']}")

    def _validate_v4(self, fail) -> None:
        n = self.num_hidden_layers
        for name, types, allowed in (("layer_types", self.layer_types, V4_LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, V4_MLP_TYPES)):
            if len(types) != n:
                fail(name, f"must have num_hidden_layers={n} entries, not {len(types)}")
            if bad := [t for t in types if t not in allowed]:
                fail(name, f"has {bad[0]!r}; entries must be one of {', '.join(allowed)}")
        for kind in set(self.layer_types) - {"sliding_attention"}:
            rate = self.compress_rates.get(kind)
            if not isinstance(rate, int) or rate <= 0:
                fail("compress_rates", f"needs a positive integer rate for {kind!r} (it is in layer_types)")
        if self.qk_rope_head_dim > self.head_dim:
            fail("qk_rope_head_dim", f"must be at most head_dim={self.head_dim} (RoPE rotates the head's last dims)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            fail("o_groups", f"must divide num_attention_heads x head_dim = {self.num_attention_heads * self.head_dim} "
                             "(the grouped output projection splits the heads' outputs into equal groups)")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            fail("scoring_func", "must be 'sqrtsoftplus' (DeepSeek-V4), 'sigmoid' or 'softmax'")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"must be at most n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts != 1:
            fail("n_shared_experts", "must be 1 (DeepSeek-V4 has one shared expert per MoE layer)")
        if self.swiglu_limit < 0:
            fail("swiglu_limit", "must be >= 0 (0: no clipping)")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be positive")
        if self.hc_eps < 0:
            fail("hc_eps", "must be >= 0")
        if "compressed_sparse_attention" in self.layer_types:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                    fail(name, "must be a positive integer (layer_types has compressed sparse attention)")
            if self.index_head_dim < self.qk_rope_head_dim:
                fail("index_head_dim", f"must be at least qk_rope_head_dim={self.qk_rope_head_dim}")

    def _validate_indexer(self, fail) -> None:
        if self.q_lora_rank is None:
            fail("q_lora_rank", "must be set with sparse attention (index_n_heads > 0): the indexer's queries come "
                                "from the compressed query latent")
        if self.scoring_func != "sigmoid":
            fail("scoring_func", "must be 'sigmoid' with sparse attention (DeepSeek-V3.2 routes as V3)")
        if not isinstance(self.index_head_dim, int) or self.index_head_dim < self.qk_rope_head_dim:
            fail("index_head_dim", f"must be an integer >= qk_rope_head_dim={self.qk_rope_head_dim} (the indexer "
                                   "rotates its first qk_rope_head_dim dimensions)")
        if not isinstance(self.index_topk, int) or self.index_topk <= 0:
            fail("index_topk", "must be a positive integer")

    def _validate_moe(self, fail) -> None:
        if self.n_routed_experts <= 0:
            fail("n_routed_experts", "must be positive when a layer is MoE (first_k_dense_replace < num_hidden_layers)")
        if self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "must be positive")
        if self.n_shared_experts < 0:
            fail("n_shared_experts", "must be >= 0")
        if self.scoring_func not in ("sigmoid", "softmax"):
            fail("scoring_func", "must be 'sigmoid' (DeepSeek-V3) or 'softmax' (DeepSeek-V2)")
        if self.topk_method not in SCORING:
            fail("topk_method", f"must be one of {', '.join(SCORING)}")
        if SCORING[self.topk_method] != self.scoring_func:
            fail("topk_method", f"goes with scoring_func={SCORING[self.topk_method]!r}, "
                                f"not {self.scoring_func!r} (noaux_tc is V3's sigmoid router; greedy and "
                                "group_limited_greedy are V2's softmax routers)")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method == "noaux_tc" and per_group < 2:
            fail("n_group", f"leaves {per_group} expert per group; V3 routing scores a group by its top-2 experts, "
                            "so each group needs at least 2")
        if not 1 <= self.topk_group <= self.n_group:
            fail("topk_group", f"must be between 1 and n_group={self.n_group}")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            fail("num_experts_per_tok", f"must be between 1 and topk_group x experts per group = "
                                        f"{self.topk_group} x {per_group} = {self.topk_group * per_group}")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be positive")

    # ---------------------------------------------------------------- derived shapes

    @property
    def has_moe(self) -> bool:
        return self.v4 or self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.v4 or layer >= self.first_k_dense_replace

    # ---------------------------------------------------------------- accounting

    def _attention_params(self) -> int:
        d, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = d * H * self.qk_head_dim
        else:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim))
        return q + kv + H * self.v_head_dim * d + self._indexer_params()

    def _indexer_params(self) -> int:
        """The lightning indexer's: query and key projections, the key's LayerNorm, the per-head weights."""
        if not self.sparse_attention:
            return 0
        Hi, Di, d = self.index_n_heads, self.index_head_dim, self.hidden_size
        return self.q_lora_rank * Hi * Di + d * Di + 2 * Di + d * Hi

    def _layer_params(self, moe: bool) -> tuple[int, int]:
        """(total, active) parameters of one decoder layer."""
        d = self.hidden_size
        base = self._attention_params() + 2 * d  # two RMSNorms
        if not moe:
            ffn = 3 * d * self.intermediate_size
            return base + ffn, base + ffn
        expert = 3 * d * self.moe_intermediate_size
        router = self.n_routed_experts * d  # the correction bias is a buffer, not a parameter
        shared = self.n_shared_experts * expert
        total = base + router + shared + self.n_routed_experts * expert
        return total, base + router + shared + self.num_experts_per_tok * expert

    def _v4_attention_params(self, layer_type: str) -> int:
        """DeepSeek-V4 attention: query LoRA, the one KV head, the grouped output projection, the sinks, and the
        layer's compressor (and CSA's indexer with a compressor of its own)."""
        d, H, D, q = self.hidden_size, self.num_attention_heads, self.head_dim, self.q_lora_rank
        params = d * q + q + q * H * D + d * D + D + H * D * self.o_lora_rank + self.o_groups * self.o_lora_rank * d + H

        def compressor(head_dim: int, overlap: bool) -> int:  # kv and gate projections, position bias, norm
            width = 2 * head_dim if overlap else head_dim
            return 2 * d * width + self.compress_rates[layer_type] * width + head_dim

        if layer_type == "compressed_sparse_attention":
            Hi, Di = self.index_n_heads, self.index_head_dim
            params += compressor(D, True) + compressor(Di, True) + q * Hi * Di + d * Hi
        elif layer_type == "heavily_compressed_attention":
            params += compressor(D, False)
        return params

    def _v4_layer_params(self, layer_type: str) -> tuple[int, int]:
        """(total, active) of one V4 layer: attention, MoE (the shared expert and K of the routed ones active), the
        two norms and the two mHC maps."""
        d, n = self.hidden_size, self.hc_mult
        expert = 3 * d * self.moe_intermediate_size
        hc = (2 + n) * n * (n * d + 1) + 3
        base = self._v4_attention_params(layer_type) + 2 * d + 2 * hc + self.n_routed_experts * d + expert
        return base + self.n_routed_experts * expert, base + self.num_experts_per_tok * expert

    def param_counts(self) -> ParamCounts:
        d, V = self.hidden_size, self.vocab_size
        emb = V * d
        head = 0 if self.tie_word_embeddings else V * d
        total, active = emb + head + d, head + d  # + final norm
        if self.v4:  # the hyper head, then each layer's own attention type
            hc_head = self.hc_mult * (self.hc_mult * d + 1) + 1
            total, active = total + hc_head, active + hc_head
            layers = [self._v4_layer_params(t) for t in self.layer_types]
            mtp_t, mtp_a = self._v4_layer_params("sliding_attention")
            mtp_extra = 2 * d * d + 3 * d + hc_head  # e_proj, h_proj, enorm, hnorm, norm, the module's hyper head
        else:
            layers = [self._layer_params(self.is_moe_layer(layer)) for layer in range(self.num_hidden_layers)]
            mtp_t, mtp_a = self._layer_params(moe=True)
            mtp_extra = 2 * d * d + 3 * d  # eh_proj, enorm, hnorm, shared_head.norm
        for t, a in layers:
            total, active = total + t, active + a
        D = self.num_nextn_predict_layers
        return ParamCounts(total, active, D * (mtp_t + mtp_extra), D * (mtp_a + mtp_extra), emb)

    def flops_per_token(self, seq_len: int, include_mtp: bool = True) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) at context `seq_len`.

        Matmuls: 6 FLOPs per active weight (the embedding is a lookup and costs none). Attention scores and the
        weighted sum: 6 * layers * heads * (qk_head_dim + v_head_dim) * keys, counting every key position as
        PaLM's and nanochat's MFU convention does (no causal discount). With sparse attention a query attends to
        min(seq_len, index_topk) keys, and its indexer scores all seq_len of them: 6 * layers * index_n_heads *
        index_head_dim * seq_len more.
        """
        pc = self.param_counts()
        weights = pc.active
        layers = self.num_hidden_layers
        if include_mtp:  # each MTP module runs its own block, then the shared output head
            D = self.num_nextn_predict_layers
            weights += pc.mtp_active + D * self.vocab_size * self.hidden_size
            layers += D
        if self.v4:
            mtp_layers = ["sliding_attention"] * (layers - self.num_hidden_layers)
            return float(6 * weights + sum(self._v4_attention_flops(t, seq_len) for t in self.layer_types + mtp_layers))
        keys = min(seq_len, self.index_topk) if self.sparse_attention else seq_len
        attn = 6 * layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * keys
        if self.sparse_attention:
            attn += 6 * layers * self.index_n_heads * self.index_head_dim * seq_len
        return float(6 * weights + attn)

    def _v4_attention_flops(self, layer_type: str, seq_len: int) -> int:
        """Training FLOPs per token of one V4 layer's attention scores and weighted sum: every head reads the
        sliding window's keys and the compressed entries it may attend (CSA: the index_topk its indexer picks, which
        scores all of them), each key of head_dim serving as value too. Counted at full length, as flops_per_token
        counts keys."""
        keys, index = min(seq_len, self.sliding_window), 0
        if layer_type != "sliding_attention":
            entries = seq_len // self.compress_rates[layer_type]
            if layer_type == "compressed_sparse_attention":
                keys += min(entries, self.index_topk)
                index = 6 * self.index_n_heads * self.index_head_dim * entries
            else:
                keys += entries
        return 6 * self.num_attention_heads * 2 * self.head_dim * keys + index

    def mtp_training_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the MTP modules alone (`--train mtp`): the main model forward up to its final
        norm (its output head's loss is left out: training_loss), the modules forward and backward."""
        main = self.flops_per_token(seq_len, include_mtp=False)
        return (main - self.head_flops_per_token()) / 3 + self.flops_per_token(seq_len) - main

    def head_flops_per_token(self) -> int:
        """Training FLOPs of one pass through the output head per position, as flops_per_token counts them (none
        for a tied head, whose weight param_counts counts as the embedding's)."""
        return 0 if self.tie_word_embeddings else 6 * self.vocab_size * self.hidden_size

    def indexer_training_flops_per_token(self, seq_len: int, include_mtp: bool = True) -> float:
        """Training FLOPs per token of the sparse-attention indexers alone (`--train indexer`): the model forward
        with dense attention, the indexers forward and backward."""
        dense = self.replace(index_n_heads=0)
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        indexers = 6 * layers * (self._indexer_params() + self.index_n_heads * self.index_head_dim * seq_len)
        return dense.flops_per_token(seq_len, include_mtp) / 3 + indexers

    def kv_cache_values(self, context: int) -> int:
        """Values one sequence's decode cache holds at `context` tokens (the main model's layers). MLA: the latent
        and RoPE key of every position in every layer (and V3.2's indexer key). V4 (leanseek.infer.compressed_cache):
        per layer the sliding window's keys, the compressed entries (and CSA's indexer keys), and each compressor's
        pending input (the values and gates of its last 2 x rate tokens)."""
        if not self.v4:
            return self.kv_cache_values_per_token()["mla"] * context
        values = 0
        for kind in self.layer_types:
            values += min(context, self.sliding_window) * self.head_dim
            if kind == "sliding_attention":
                continue
            rate, overlap = self.compress_rates[kind], kind == "compressed_sparse_attention"
            entries = [(self.head_dim, 2 if overlap else 1)] + ([(self.index_head_dim, 2)] if overlap else [])
            for width, series in entries:
                values += context // rate * width + 2 * (2 * rate) * series * width
        return values

    def kv_cache_values_per_token(self) -> dict[str, int]:
        """Values cached per token: MLA's latent + rope key (and, with sparse attention, the indexer's key), against
        standard MHA with the same heads."""
        index = self.index_head_dim if self.sparse_attention else 0
        mla = self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim + index)
        mha = self.num_hidden_layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return {"mla": mla, "mha": mha, "indexer": self.num_hidden_layers * index}


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature sqrt(t) = 0.1 * mscale * ln(s) + 1 (V3 report section 4.3)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    """Accept DeepSeek's {"type": "yarn", ...} and HF's {"rope_type": "yarn", ...}; return DeepSeek's form."""
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (DeepSeek models use 'yarn')")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ConfigError(f"rope_scaling.{key} is missing")
    if rs.get("truncate", True) is not True:
        raise ConfigError("rope_scaling.truncate=false is not supported")
    out = {"type": "yarn", "factor": float(rs["factor"]),
           "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
           "beta_fast": float(rs.get("beta_fast", 32.0)), "beta_slow": float(rs.get("beta_slow", 1.0))}
    # transformers multiplies cos/sin by m(s, mscale)/m(s, mscale_all_dim), and by m(s, 1) when a key is absent;
    # DeepSeek never scales cos/sin. Writing both keys explicitly keeps every reader on the same math.
    out["mscale"] = float(rs.get("mscale", 1.0))
    out["mscale_all_dim"] = float(rs.get("mscale_all_dim", out["mscale"]))
    return out
