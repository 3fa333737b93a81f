"""Hugging Face checkpoint interchange: `load_hf` reads a DeepseekV3/V2/V32/V4ForCausalLM folder, `save_hf` writes
one.

On disk (transformers' save_pretrained, DeepSeek's releases, vLLM and SGLang agree on it): config.json in DeepSeek's
own form, safetensors under `model.`-prefixed names, one tensor set per routed expert, and MTP module k stored as
decoder layer num_hidden_layers + k with its own copies of the embedding and output head.

DeepSeek-V4 checkpoints keep DeepSeek's own names (`embed.weight`, `layers.0.attn.wq_a.weight`,
`layers.0.ffn.experts.0.w1.weight`, `mtp.0.e_proj.weight`, ...), which transformers renames on load; leanseek writes
them as the release does, and reads them, or transformers' save_pretrained variant of them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import write_atomic, write_text_atomic
from .config import ConfigError, ModelConfig
from .dequant import dequantize
from .transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder does not hold what its config.json describes; the message names the tensors or file."""


# ---------------------------------------------------------------------------------------------- name mapping

def _hf_prefix(key: str, cfg: ModelConfig) -> tuple[str, str]:
    """Split a leanseek state-dict key into (HF prefix, rest), e.g. 'mtp.0.block.mlp.gate.weight' ->
    ('model.layers.61.', 'mlp.gate.weight')."""
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
        return f"model.layers.{m[1]}.", m[2]
    if m := re.fullmatch(r"mtp\.(\d+)\.(.+)", key):
        rest = m[2].removeprefix("block.").replace("shared_head_norm.", "shared_head.norm.")
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.", rest
    if key == "lm_head.weight":
        return "", key
    return "model.", key


# leanseek's V4 names (transformers' DeepseekV4 modules) -> DeepSeek's, rewritten in this order
_V4_NAMES = [(r"^(mtp\.\d+)\.block\.", r"\1."), (r"^embed_tokens\.", "embed."), (r"^lm_head\.", "head."),
             (r"(^|\.)hc_head\.hc_(fn|base|scale)$", r"\1hc_head_\2"),
             (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
             (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
             (r"\.self_attn\.compressor\.indexer\.(q_b_proj|weights_proj)\.", r".attn.indexer.\1."),
             (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."), (r"\.self_attn\.", ".attn."),
             (r"\.mlp\.", ".ffn."), (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
             (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
             (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
             (r"\.compressor\.kv_proj\.", ".compressor.wkv."), (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
             (r"\.compressor\.kv_norm\.", ".compressor.norm."), (r"\.compressor\.position_bias$", ".compressor.ape"),
             (r"\.attn\.q_a_proj\.", ".attn.wq_a."), (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
             (r"\.q_b_proj\.", ".wq_b."), (r"\.attn\.kv_proj\.", ".attn.wkv."), (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
             (r"\.attn\.o_b_proj\.", ".attn.wo_b."), (r"\.attn\.sinks$", ".attn.attn_sink"),
             (r"\.gate\.e_score_correction_bias$", ".gate.bias")]
# transformers' save_pretrained writes some V4 names its own way; read as DeepSeek's
_V4_SAVED = [(r"^model\.", ""), (r"^embed_tokens\.", "embed."), (r"^lm_head\.", "head."),
             (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"), (r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm.")]
# DeepSeek keeps these in float32 whatever the weights' dtype
_V4_FLOAT32 = re.compile(r".*(hc_\w+_(fn|base|scale)|hc_head_\w+|attn_sink|\.ape|gate\.bias)$")


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def _tensor_plan_v4(model: Transformer) -> Iterator[tuple[str, list[str], Callable, Callable]]:
    """_tensor_plan for V4: DeepSeek's names, experts as w1 (gate), w3 (up), w2 (down) each."""
    E, Ie = model.cfg.n_routed_experts, model.cfg.moe_intermediate_size
    for key in model.state_dict():
        if key == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        name = _rename(key, _V4_NAMES)
        if name.endswith(".experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            yield (key, [f"{base}{j}.{w}.weight" for j in range(E) for w in ("w1", "w3")],
                   lambda t: [half for j in range(E) for half in (t[j, :Ie], t[j, Ie:])],
                   lambda ts: torch.stack([torch.cat(ts[2 * j:2 * j + 2]) for j in range(E)]))
        elif name.endswith(".experts.down_proj"):
            yield key, [f"{name.removesuffix('down_proj')}{j}.w2.weight" for j in range(E)], list, torch.stack
        else:
            yield key, [name], lambda t: [t], lambda ts: ts[0]


def _tensor_plan(model: Transformer) -> Iterator[tuple[str, list[str], Callable, Callable]]:
    """For each leanseek tensor: (key, HF names, split(tensor) -> HF tensors, join(HF tensors) -> tensor)."""
    cfg = model.cfg
    if cfg.v4:
        yield from _tensor_plan_v4(model)
        return
    E, Ie = cfg.n_routed_experts, cfg.moe_intermediate_size
    for key in model.state_dict():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        prefix, rest = _hf_prefix(key, cfg)
        if rest.endswith("mlp.experts.gate_up_proj"):
            base = prefix + rest.removesuffix("gate_up_proj")
            names = [f"{base}{j}.{p}_proj.weight" for j in range(E) for p in ("gate", "up")]
            yield (key, names, lambda t: [half for j in range(E) for half in (t[j, :Ie], t[j, Ie:])],
                   lambda ts: torch.stack([torch.cat(ts[2 * j:2 * j + 2]) for j in range(E)]))
        elif rest.endswith("mlp.experts.down_proj"):
            base = prefix + rest.removesuffix("down_proj")
            yield key, [f"{base}{j}.down_proj.weight" for j in range(E)], list, torch.stack
        else:
            yield key, [prefix + rest], lambda t: [t], lambda ts: ts[0]
    # each MTP layer also carries copies of the shared embedding and head (vLLM and SGLang read them)
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        yield "embed_tokens.weight", [prefix + "embed_tokens.weight"], lambda t: [t], None
        yield "lm_head.weight", [prefix + "shared_head.head.weight"], lambda t: [t], None


# ---------------------------------------------------------------------------------------------- save

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB'")
    return int(float(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]])


def _keeps_float32(key: str, name: str) -> bool:
    """The routing bias, and V4's mHC, sink and compressor position parameters, stay float32 on disk."""
    return key.endswith("e_score_correction_bias") or bool(_V4_FLOAT32.fullmatch(name))


def save_hf(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None,
            max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face DeepseekV3ForCausalLM (or V2) folder that transformers, vLLM and SGLang load.

    Every file is written to a temporary name and renamed into place; stale shards of an earlier save are removed.
    dtype: cast floating weights (the routing bias stays float32). Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    # (HF name, leanseek key, split, part index, bytes); tensors are materialised shard by shard
    entries, names_of = [], {}
    for key, names, split, _ in _tensor_plan(model):
        names_of[key] = names
        t = state[key]
        itemsize = 4 if _keeps_float32(key, names[0]) else (dtype or t.dtype).itemsize
        entries += [(name, key, split, i, t.numel() // len(names) * itemsize) for i, name in enumerate(names)]

    views: dict[str, list[torch.Tensor]] = {}  # split once per tensor (views: no memory)

    def tensor(key: str, split: Callable, i: int) -> torch.Tensor:
        if key not in views:
            views[key] = split(state[key].detach())
        t = views[key][i]
        if _keeps_float32(key, names_of[key][0]):
            t = t.float()
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to("cpu").contiguous().clone()  # clone: safetensors refuses tensors that share storage

    limit = _parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[-1] > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[-1]
    files = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {name: tensor(key, split, i) for name, key, split, i, _ in shard}
        write_atomic(path / file, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(path / INDEX, json.dumps(index, indent=2))
    else:
        (path / INDEX).unlink(missing_ok=True)
    for stale in path.glob("model*.safetensors"):
        if stale.name not in files:
            stale.unlink()
    config = model.cfg.to_hf()
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- load

def read_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from a checkpoint folder's config.json."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a Hugging Face model folder needs a config.json")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8 (a damaged file)
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file} holds a JSON {type(hf).__name__}, not an object of config fields")
    try:
        return ModelConfig.from_hf(hf)
    except (ConfigError, ValueError, TypeError) as e:  # ValueError, TypeError: fields of the wrong kind
        raise CheckpointError(f"{file}: {e}") from None


def _open_shards(path: Path) -> dict[str, object]:
    """HF name -> an open (memory-mapped) safetensors handle holding it."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX} is damaged: no weight_map of tensor names to files "
                                  f"({type(e).__name__}: {e})") from None
    elif (path / SINGLE).is_file():
        files = [SINGLE]
    else:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(pickled)}: leanseek never unpickles checkpoints)" if pickled else ""
        raise CheckpointError(f"{path} holds neither {SINGLE} nor {INDEX}{hint}")
    handles = {}
    for file in files:
        if not (path / file).is_file():
            raise CheckpointError(f"{path / file} is listed in {INDEX} but missing")
        try:
            f = safe_open(str(path / file), framework="pt")
        except SafetensorError as e:  # a truncated, zeroed or overwritten file fails the header's checks
            raise CheckpointError(f"{path / file} is damaged ({(path / file).stat().st_size:,} bytes): not a "
                                  f"complete safetensors file ({e})") from None
        for name in f.keys():
            handles[name] = f
    return handles


def _scale_name(handles: dict, name: str) -> str | None:
    """The scale of a quantised weight: `<name>_scale_inv` (V3's FP8) or `<module>.scale` (V4's FP8 and FP4)."""
    for scale in (name + "_scale_inv", name.removesuffix(".weight") + ".scale"):
        if scale != name and scale in handles:
            return scale
    return None


def _read(handles: dict, name: str, block: tuple[int, int]) -> torch.Tensor:
    t = handles[name].get_tensor(name)
    if (scale := _scale_name(handles, name)) is not None:  # DeepSeek's FP8 / FP4 releases (dequant.py)
        t = dequantize(t, handles[scale].get_tensor(scale), block)
    elif t.dtype == torch.int32:  # DeepSeek's reference code declares the hash table int32
        t = t.long()
    return t


class _Renamed:
    """A safetensors handle read under other names (V4 names as DeepSeek writes them)."""

    def __init__(self, handle, names: dict[str, str]):
        self.handle, self.names = handle, names

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(self.names[name])

    def get_slice(self, name: str):
        return self.handle.get_slice(self.names[name])


def _stored_shape(handles: dict, name: str) -> tuple[int, ...]:
    """A tensor's shape as the model holds it: packed FP4 holds two values a byte."""
    view = handles[name].get_slice(name)
    shape = tuple(view.get_shape())
    if view.get_dtype() == "I8" and _scale_name(handles, name) is not None:
        return shape[:-1] + (2 * shape[-1],)
    return shape


def _checked_plan(path: Path, cfg: ModelConfig) -> tuple[Transformer, dict, list, tuple[int, int]]:
    """The model built on the meta device, the open shards, the tensor plan and the FP8 block size, after checking
    that the folder holds exactly the tensors its config.json describes."""
    handles = _open_shards(path)
    if cfg.v4:
        renamed = {}
        for stored, handle in handles.items():
            name = _rename(stored, _V4_SAVED)
            renamed.setdefault(id(handle), _Renamed(handle, {})).names[name] = stored
        handles = {name: r for r in renamed.values() for name in r.names}
    mtp_probe = "mtp.0.e_proj.weight" if cfg.v4 else f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    if cfg.num_nextn_predict_layers and mtp_probe not in handles:
        # transformers writes num_nextn_predict_layers=1 by default, with no MTP weights behind it
        warnings.warn(f"{path}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but no "
                      f"MTP weights ({mtp_probe}); loading without MTP", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = model.state_dict()
    plan = list(_tensor_plan(model))
    expected: dict[str, tuple[int, ...]] = {}
    for key, names, split, _ in plan:
        for name, part in zip(names, split(state[key])):
            expected[name] = tuple(part.shape)
    optional = {n for key, names, _, join in plan if join is None for n in names}  # MTP copies of embed/head
    ignorable = re.compile(r".*(_scale_inv|\.scale|rotary_emb\.inv_freq)$")
    missing = [n for n in expected if n not in handles and n not in optional]
    # (transformers builds a zero-width shared expert when n_shared_experts=0, and saves it)
    unexpected = [n for n in handles if n not in expected and not ignorable.fullmatch(n)
                  and 0 not in handles[n].get_slice(n).get_shape()]
    wrong = [f"{n} {_stored_shape(handles, n)} (expected {shape})"
             for n, shape in expected.items() if n in handles and _stored_shape(handles, n) != shape]
    if missing or unexpected or wrong:
        def listing(label: str, items: list[str]) -> str:
            more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
            return f"\n  {label} ({len(items)}): {', '.join(items[:8])}{more}" if items else ""
        raise CheckpointError(f"{path} does not match its config.json (model_type {cfg.model_type}):"
                              + listing("missing", missing) + listing("unexpected", unexpected)
                              + listing("wrong shape", wrong))
    quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    return model, handles, plan, block


def _read_plan(handles: dict, plan: list, block: tuple[int, int], dtype: torch.dtype | None,
               device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """(leanseek key, tensor) for each entry of `plan`, read and joined (experts stacked), in `dtype` (None: as
    stored; the routing bias in float32)."""
    for key, names, _, join in plan:
        if join is None:
            continue
        parts = [_read(handles, n, block) for n in names]
        t = join(parts) if len(parts) > 1 else parts[0]
        del parts  # a layer's experts are the largest tensors read: hold one copy of them at a time
        if not t.is_floating_point():  # V4's hash table
            yield key, t.to(device=device, dtype=torch.long)
            continue
        yield key, t.to(device=device, dtype=torch.float32 if key.endswith("e_score_correction_bias") else dtype)


def load_hf_streamed(path: str | os.PathLike,
                     dtype: torch.dtype = torch.float32) -> tuple[Transformer, Iterator[torch.nn.Module]]:
    """A Hugging Face folder larger than memory, a decoder layer at a time: the model built on the meta device
    with its embedding, final norm and head loaded (MTP modules not), and an iterator that loads each decoder layer
    in turn, yields it and drops its weights when the next one is asked for. Checked as `load_hf` checks."""
    from ..train.integrity import verify  # here: leanseek.train imports this module

    path = Path(path)
    if (path / "model-shards").is_dir():  # a sharded training run: read whole (its shards hold every layer)
        model = load_hf(path, dtype)
        return model, iter(model.layers)
    verify(path)
    model, handles, plan, block = _checked_plan(path, read_config(path))
    top = [entry for entry in plan if not entry[0].startswith(("layers.", "mtp."))]
    model.load_state_dict(dict(_read_plan(handles, top, block, dtype, "cpu")), strict=False, assign=True)
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rotary("cpu")

    def layers() -> Iterator[torch.nn.Module]:
        for i, layer in enumerate(model.layers):
            mine = [entry for entry in plan if entry[0].startswith(f"layers.{i}.")]
            state = {key.removeprefix(f"layers.{i}."): t for key, t in _read_plan(handles, mine, block, dtype, "cpu")}
            layer.load_state_dict(state, assign=True)
            yield layer
            model.layers[i] = layer.to("meta")

    return model.eval(), layers()


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", quantize: str | None = None) -> Transformer:
    """Load a Hugging Face DeepseekV3ForCausalLM / DeepseekV2ForCausalLM folder (config.json + safetensors), or a
    sharded (FSDP) run's checkpoint, whole, in this process.

    Tensors are read one at a time from memory-mapped files into a model built without allocating weights.
    FP8 block-quantised weights (DeepSeek's release format) are dequantised. Raises CheckpointError naming
    missing, unexpected or wrongly shaped tensors, or a damaged file (verified against checksums.json when the
    folder has one, which catches damage that leaves a file readable, such as zeroed bytes).

    quantize: "int8" or "int4" (leanseek.infer.quantize, CPU only): each module is quantised as soon as its
    tensors are read, so the whole model is never held in float."""
    from ..infer.quantize import check_mode, check_model, quantize_loaded, quantize_model
    from ..train.integrity import verify  # here: leanseek.train imports this module

    if quantize is not None:
        check_mode(quantize, device)
    path = Path(path)
    verify(path)
    cfg = read_config(path)
    if quantize is not None:
        check_model(cfg)
    if (path / "model-shards").is_dir():  # a sharded training run's checkpoint (leanseek.train.sharded)
        from ..train.sharded import read_sharded_model

        model = read_sharded_model(path, cfg, dtype, device)
        return model if quantize is None else quantize_model(model, quantize)
    model, handles, plan, block = _checked_plan(path, cfg)
    loaded = {}
    # quantising: read as stored (quantisation takes an expert or a linear at a time to float32), and bring what
    # stays float to `dtype` at the end
    for key, t in _read_plan(handles, plan, block, dtype if quantize is None else None, device):
        if quantize is None:
            loaded[key] = t
        else:  # into the model now, and its module quantised once complete (a tied head stays float)
            model.load_state_dict({key: t}, strict=False, assign=True)
            quantize_loaded(model, key, quantize)
    if cfg.tie_word_embeddings and quantize is None:
        loaded["lm_head.weight"] = loaded["embed_tokens.weight"]
    model.load_state_dict(loaded, strict=quantize is None, assign=True)
    if quantize is not None:  # the embeddings, norms, kv_b_proj and routers (quantised weights are buffers)
        for p in model.parameters():
            p.data = p.data.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rotary(device)
    return model.eval()

