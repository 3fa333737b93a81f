"""A checkpoint as one GGUF file for llama.cpp (and Ollama, LM Studio, llama-cpp-python): `leanseek export RUN
--gguf OUT.gguf [--outtype f32|f16|q8_0]`.

What llama.cpp's `deepseek2` architecture reads, as its own converter (convert_hf_to_gguf.py, DeepseekV2Model)
writes it for DeepSeek-V2/V3 checkpoints:
- MLA in its absorbed form: one shared KV "head" of kv_lora_rank + qk_rope_head_dim values (the latent cache),
  with kv_b_proj split per head into attn_k_b (transposed: it multiplies the query's no-RoPE part) and attn_v_b;
- routed experts stacked per layer; the router and the routing bias kept in float32;
- RoPE on interleaved pairs, as DeepSeek's checkpoints store it (llama.cpp's NORM type): no permutation;
- no MTP module (llama.cpp does not run DeepSeek's), so block_count is num_hidden_layers;
- the tokenizer as a GPT-2-style byte-level BPE whose pre-tokenizer type is "smollm": digits isolated one by one,
  then GPT-2's split, which is exactly leanseek's (data/tokenizer.py); its control tokens typed CONTROL, so text
  that spells them stays text, as in leanseek's own encode.

Quantisation (q8_0, q4_0, f16) applies to the matrices; norms, biases and the router stay float32, and a matrix
whose rows are not a multiple of the format's 32-value block falls back to f16, as llama.cpp's converter does. A
checkpoint is read a decoder layer at a time (load_hf_streamed), so models larger than memory export.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models

from ..data import TextTokenizer
from ..data.chat import CHAT_TEMPLATE
from ..data.tokenizer import _pre_tokenizer
from ..model.transformer import Transformer

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
PRE_TOKENIZER = "smollm"  # llama.cpp's [\p{N}, GPT-2] split, without its clean-up of spaces on decode
# a decoder layer's tensors (leanseek's state-dict keys, the Hugging Face names less "model.layers.N.") -> GGUF's
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_a_proj.weight": "attn_q_a", "self_attn.q_a_layernorm.weight": "attn_q_a_norm",
    "self_attn.q_b_proj.weight": "attn_q_b", "self_attn.q_proj.weight": "attn_q",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa", "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm",
    "self_attn.o_proj.weight": "attn_output",
    "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
    "mlp.gate.weight": "ffn_gate_inp", "mlp.gate.e_score_correction_bias": "exp_probs_b",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp", "mlp.shared_experts.up_proj.weight": "ffn_up_shexp",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SystemExit("writing GGUF needs the gguf package: pip install 'leanseek[gguf]' (or: pip install gguf)")
    return gguf


def check_supported(model: Transformer) -> None:
    """llama.cpp scores expert groups as DeepSeek-V3 does (the sum of each group's two best biased scores);
    DeepSeek-V2's group_limited_greedy (a group's best score) has no equivalent there."""
    cfg = model.cfg
    if cfg.topk_method == "group_limited_greedy" and 1 < cfg.topk_group < cfg.n_group:
        raise ValueError(f"topk_method='group_limited_greedy' with n_group={cfg.n_group}, topk_group={cfg.topk_group}"
                         ": llama.cpp's deepseek2 has no such routing (it scores groups as DeepSeek-V3 does)")
    if cfg.v4:
        raise ValueError("model_type deepseek_v4: llama.cpp's deepseek2 has no DeepSeek-V4 layers (compressed "
                         "attention, hyper-connections, hash routing)")
    if cfg.sparse_attention:
        raise ValueError(f"index_n_heads={cfg.index_n_heads}: llama.cpp's deepseek2 has no sparse attention "
                         "(DeepSeek-V3.2's indexer); it would run the model densely, which is another model")


def top_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The GGUF tensors outside the decoder layers (see layer_tensors)."""
    return {"token_embd.weight": model.embed_tokens.weight, "output_norm.weight": model.norm.weight,
            "output.weight": model.lm_head.weight}


def layer_tensors(cfg, i: int, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Decoder layer i's GGUF tensors, named as llama.cpp's deepseek2 loader reads them, in PyTorch's (row-major)
    shapes (the file stores each shape reversed: ggml's order); views of the layer's own weights."""
    H, nope, v, Ie = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.moe_intermediate_size
    out, blk = {}, f"blk.{i}."
    for key, t in layer.state_dict().items():
        if key == "self_attn.kv_b_proj.weight":
            kv_b = t.view(H, nope + v, cfg.kv_lora_rank)
            out[blk + "attn_k_b.weight"] = kv_b[:, :nope].transpose(1, 2)  # [H, kv_lora, nope]
            out[blk + "attn_v_b.weight"] = kv_b[:, nope:]  # [H, v, kv_lora]
        elif key == "mlp.experts.gate_up_proj":  # [E, 2 x Ie, hidden]: each expert's gate rows, then up rows
            out[blk + "ffn_gate_exps.weight"], out[blk + "ffn_up_exps.weight"] = t[:, :Ie], t[:, Ie:]
        elif key == "mlp.experts.down_proj":
            out[blk + "ffn_down_exps.weight"] = t
        elif key in LAYER_TENSORS:
            out[blk + LAYER_TENSORS[key] + (".bias" if key.endswith("_bias") else ".weight")] = t
        else:
            raise ValueError(f"no GGUF name for layer {i}'s tensor {key!r}")
    return out


def _keeps_float32(name: str, t: torch.Tensor) -> bool:
    return t.dim() < 2 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight")


def write_metadata(writer, model: Transformer, tokenizer: TextTokenizer, file_type: int) -> None:
    gguf = _gguf()
    cfg = model.cfg
    writer.add_type("model")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(1)  # absorbed MLA is multi-query attention over the latent
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: a full-rank query (attn_q); llama.cpp needs the key
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    dense = cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers
    writer.add_leading_dense_block_count(min(dense, cfg.num_hidden_layers))
    writer.add_expert_count(cfg.n_routed_experts or 0)
    writer.add_expert_used_count(cfg.num_experts_per_tok or 0)
    writer.add_expert_shared_count(cfg.n_shared_experts or 0)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.topk_method != "greedy" and 1 < cfg.topk_group < cfg.n_group:  # llama.cpp refuses topk_group == n_group
        writer.add_expert_group_count(cfg.n_group)
        writer.add_expert_group_used_count(cfg.topk_group)
    rs = cfg.rope_scaling
    if rs:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs["factor"])
        writer.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rs["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rs["beta_slow"])
    # llama.cpp's attention temperature; stored x 0.1 by the converter and read back / 0.1
    writer.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"] if rs else 0.0)
    write_tokenizer(writer, tokenizer, cfg.vocab_size)


def write_tokenizer(writer, tokenizer: TextTokenizer, vocab_size: int) -> None:
    gguf = _gguf()
    spec = json.loads(tokenizer.tk.to_str())
    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = _pre_tokenizer()
    if spec["model"]["type"] != "BPE" or spec["pre_tokenizer"] != json.loads(reference.to_str())["pre_tokenizer"]:
        raise ValueError("the tokenizer is not one `leanseek data` trains (byte-level BPE after leanseek's split), "
                         "so no llama.cpp pre-tokenizer is known to match it; for a DeepSeek release use "
                         "llama.cpp's convert_hf_to_gguf.py")
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in tokenizer.tk.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    control = set(tokenizer.control_tokens.values())
    types = [gguf.TokenType.CONTROL if i in control else
             gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    end = tokenizer.token_id("<|end|>")
    if end is not None:
        writer.add_eot_token_id(end)  # the end of the assistant's turn: chat generation stops there
    writer.add_add_bos_token(False)  # leanseek's chat template writes <|bos|> itself
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _kind(gguf, name: str, t: torch.Tensor, outtype: str):
    """The GGML type a tensor is written in: norms, biases and the router float32; the rest outtype, where a row
    is a whole number of the format's blocks (else f16, as llama.cpp's converter does)."""
    if outtype == "f32" or _keeps_float32(name, t):
        return gguf.GGMLQuantizationType.F32
    kind = getattr(gguf.GGMLQuantizationType, outtype.upper())
    if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        if t.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            return gguf.GGMLQuantizationType.F16
    return kind


def write_gguf(model: Transformer, tokenizer: TextTokenizer, out: Path, outtype: str = "f32",
               name: str | None = None, layers: Iterator[torch.nn.Module] | None = None) -> dict:
    """Write `out` (atomically: a temporary file beside it, renamed into place). Returns {"tensors", "bytes",
    "types": {GGML type: count}}.

    layers: the decoder layers with their weights, in order (default: the model's own). With load_hf_streamed's
    iterator the model may be larger than memory: the file's tensor table is written from the shapes alone, then
    each layer's tensors as the iterator loads it, one float32 layer held at a time."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    check_supported(model)
    cfg = model.cfg
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]
    shapes = dict(top_tensors(model))  # for the table: the decoder layers' shapes (meta tensors serve)
    for i, layer in enumerate(model.layers):
        shapes.update(layer_tensors(cfg, i, layer))
    kinds = {n: _kind(gguf, n, t, outtype) for n, t in shapes.items()}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(str(tmp), "deepseek2")
        if name:
            writer.add_name(name)
        write_metadata(writer, model, tokenizer, file_type)
        for n, t in shapes.items():
            kind, shape = kinds[n], tuple(t.shape)
            if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(n, shape, np.dtype(dtype), t.numel() * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
                writer.add_tensor_info(n, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
            counts[kind.name] = counts.get(kind.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        def write(tensors: dict[str, torch.Tensor]) -> None:
            for n, t in tensors.items():
                data = t.detach().float().contiguous().numpy()
                kind = kinds[n]
                if kind == gguf.GGMLQuantizationType.F16:
                    data = data.astype(np.float16)
                elif kind != gguf.GGMLQuantizationType.F32:
                    data = gguf.quants.quantize(data, kind)
                writer.write_tensor_data(data)

        write(top_tensors(model))
        for i, layer in enumerate(layers if layers is not None else model.layers):
            write(layer_tensors(cfg, i, layer))
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"tensors": sum(counts.values()), "bytes": out.stat().st_size, "types": counts}
