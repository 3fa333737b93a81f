"""ModelConfig: the DeepSeek-V3 hyper-parameters under Hugging Face's `DeepseekV3Config` field names, and
DeepSeek-V3.2's sparse-attention indexer under `DeepseekV32Config`'s (index_n_heads > 0 makes a V3.2 model).

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
                   "auto_map", "num_local_experts", "model_type", "mlp_layer_types", "layer_types"}
SCORING = {"noaux_tc": "sigmoid", "greedy": "softmax", "group_limited_greedy": "softmax"}


class ConfigError(ValueError):
    """A config field breaks a rule; the message names the field, its value and the rule."""


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter of the main model (embedding and head included), MTP excluded
    active: int  # parameters one token touches: all but the routed experts it was not sent to
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
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # other HF keys, kept on save

    def __post_init__(self):
        if self.q_lora_rank == 0:  # DeepSeek's own ModelArgs spell "no query compression" as 0
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            self.rope_scaling = normalise_rope_scaling(self.rope_scaling)
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
        if model_type not in ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2"):
            raise ConfigError(f"model_type {model_type!r} is not supported: leanseek reads deepseek_v3, deepseek_v32, "
                              "deepseek_v2 and kimi_k2 checkpoints")
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
        if hf.get("bos_token_id") is not None and isinstance(hf["bos_token_id"], list):
            hf["bos_token_id"] = hf["bos_token_id"][0]
        if isinstance(hf.get("eos_token_id"), list):
            hf["eos_token_id"] = hf["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in hf.items() if k in names}
        return cls(**known, extra={k: v for k, v in hf.items() if k not in names})

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek-V3.2's DSA: a lightning indexer picks the keys each query attends to."""
        return self.index_n_heads > 0

    @property
    def model_type(self) -> str:
        if self.sparse_attention:
            return "deepseek_v32"
        return "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2"

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers, vLLM and SGLang read (legacy rope form, as DeepSeek's own config)."""
        arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                "deepseek_v2": "DeepseekV2ForCausalLM"}[self.model_type]
        out = {k: v for k, v in self.extra.items() if k not in DERIVED_HF_KEYS}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        if not self.sparse_attention:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                del out[name]
        out.update(architectures=[arch], model_type=self.model_type, num_key_value_heads=self.num_attention_heads,
                   hidden_act="silu", attention_bias=False, attention_dropout=0.0, moe_layer_freq=1,
                   use_cache=True, pretraining_tp=1)
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- validation

    def validate(self) -> None:
        def fail(field_name: str, rule: str):
            raise ConfigError(f"{field_name}={getattr(self, field_name)!r}: {rule}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0):
            fail("q_lora_rank", "must be a positive integer, or None for no query compression")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be between 0 and num_hidden_layers={self.num_hidden_layers}")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            fail("intermediate_size", "must be positive when there are dense layers (first_k_dense_replace > 0)")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
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
        return self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

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

    def param_counts(self) -> ParamCounts:
        d, V = self.hidden_size, self.vocab_size
        emb = V * d
        head = 0 if self.tie_word_embeddings else V * d
        total = active = emb + head + d  # + final norm
        for layer in range(self.num_hidden_layers):
            t, a = self._layer_params(self.is_moe_layer(layer))
            total, active = total + t, active + a
        mtp_t, mtp_a = self._layer_params(moe=True)
        mtp_extra = 2 * d * d + 3 * d  # eh_proj, enorm, hnorm, shared_head.norm
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
        weights = pc.active - pc.embedding
        layers = self.num_hidden_layers
        if include_mtp:  # each MTP module runs its own block, then the shared output head
            D = self.num_nextn_predict_layers
            weights += pc.mtp_active + D * self.vocab_size * self.hidden_size
            layers += D
        keys = min(seq_len, self.index_topk) if self.sparse_attention else seq_len
        attn = 6 * layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * keys
        if self.sparse_attention:
            attn += 6 * layers * self.index_n_heads * self.index_head_dim * seq_len
        return float(6 * weights + attn)

    def mtp_training_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the MTP modules alone (`--train mtp`): the main model forward, the modules
        forward and backward."""
        main = self.flops_per_token(seq_len, include_mtp=False)
        return main / 3 + self.flops_per_token(seq_len) - main

    def indexer_training_flops_per_token(self, seq_len: int, include_mtp: bool = True) -> float:
        """Training FLOPs per token of the sparse-attention indexers alone (`--train indexer`): the model forward
        with dense attention, the indexers forward and backward."""
        dense = self.replace(index_n_heads=0)
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        indexers = 6 * layers * (self._indexer_params() + self.index_n_heads * self.index_head_dim * seq_len)
        return dense.flops_per_token(seq_len, include_mtp) / 3 + indexers

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
