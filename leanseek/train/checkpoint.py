"""Training checkpoints: a Hugging Face model folder (transformers loads it as is) plus the trainer's state.

RUN_DIR/checkpoints/step-000500/   config.json, model.safetensors, tokenizer files,
                                   optimizer.safetensors, trainer_state.json
RUN_DIR/latest -> checkpoints/step-000500

A checkpoint is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the complete checkpoint or none (plus a temporary folder that the next run removes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.tokenizer import END_OF_TURN, TextTokenizer
from ..model.hf import save_hf
from ..model.transformer import Transformer



def rng_state() -> dict:
    """Python's, numpy's and torch's (CPU) generator states, as JSON."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer_state: dict, state: dict,
                    tokenizer: TextTokenizer, keep: int) -> Path:
    """Write checkpoint `step` atomically, point RUN_DIR/latest at it, and keep only the newest `keep`.

    model: with full (unsharded) weights; optimizer_state: a full optimizer state dict keyed by parameter name
    (torch.distributed.checkpoint.state_dict's form, the same with or without sharding)."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp)
    tokenizer.save(tmp)
    # transformers' generate, vLLM and SGLang stop where this says: at the end of the assistant's turn too
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.token_id(END_OF_TURN)]}, indent=2) + "\n")
    tensors = {f"{name}::{key}": value.detach().cpu().contiguous()
               for name, per_param in optimizer_state["state"].items() for key, value in per_param.items()}
    save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    groups = optimizer_state["param_groups"]
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "param_groups": groups, "step": step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = run_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.relative_to(run_dir))
    os.replace(link, run_dir / "latest")
    for old in sorted(p for p in final.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()  # gathers a sharded DTensor


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with sharded (FSDP2) tensors gathered; every rank must call it."""
    return {name: _full(t) for name, t in model.state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {parameter name: {key: tensor}}, "param_groups": [...]} with sharded tensors gathered and
    parameters named, so that it loads whatever the sharding; every rank must call it."""
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}  # by identity: DTensor equality is elementwise
    state = {n: {k: _full(v) for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
             for n, p in named if p in optimizer.state}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Inverse of full_optimizer_state: each rank keeps its own shard of every sharded tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    for name, per_param in full["state"].items():
        p = params[name]
        optimizer.state[p] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                              if isinstance(p, DTensor) and v.ndim else v.to(p.device) for k, v in per_param.items()}
    for group, saved in zip(optimizer.param_groups, full["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; leftovers of an interrupted save are removed."""
    folder = run_dir / "checkpoints"
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def checkpoint_of(path: Path) -> Path:
    """A checkpoint folder: `path` itself, or a run folder's newest checkpoint."""
    if (path / "config.json").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (config.json) nor a run folder with checkpoints")
    return found


def load_trainer_state(path: Path) -> tuple[dict, dict]:
    """(trainer state, full optimizer state dict keyed by parameter name) of checkpoint `path`."""
    state = json.loads((path / "trainer_state.json").read_text())
    per_param: dict[str, dict] = {}
    for name, tensor in load_file(path / "optimizer.safetensors").items():
        param, key = name.split("::")
        per_param.setdefault(param, {})[key] = tensor
    return state, {"state": per_param, "param_groups": state.pop("param_groups")}


def restore(checkpoint: Path, run_args: dict, keys: tuple[str, ...], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Resume a run from `checkpoint`: its optimizer and RNG states, after checking that the settings named in
    `keys` are unchanged. Returns (step, the saved cost ledger's fields)."""
    state, optimizer_state = load_trainer_state(checkpoint)
    changed = {k: (state["args"].get(k), run_args.get(k)) for k in keys if state["args"].get(k) != run_args.get(k)}
    if changed:
        raise ValueError(f"{checkpoint.parent.parent} holds a run made with other settings; changed: "
                         + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    load_optimizer_state(model, optimizer, optimizer_state)
    set_rng_state(state["rng"])
    return state["step"], state["ledger"]
