"""Training checkpoints: a Hugging Face model folder (transformers loads it as is) plus the trainer's state.

RUN_DIR/checkpoints/step-000500/   config.json, model.safetensors, tokenizer files, generation_config.json,
                                   optimizer.safetensors, trainer_state.json, checksums.json
RUN_DIR/latest -> checkpoints/step-000500

A sharded (FSDP) run writes model-shards/ and optimizer-shards/ (see sharded.py) in place of model.safetensors and
optimizer.safetensors, each rank its own shards; load_hf reads either kind, and `leanseek export` turns a sharded
one into a Hugging Face folder.

A checkpoint is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the complete checkpoint or none (plus a temporary folder that the next run removes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..data.tokenizer import END_OF_TURN, TextTokenizer
from ..model.hf import CheckpointError, save_hf
from ..model.transformer import Transformer
from .integrity import CHECKSUMS, seal, verify

MODEL_SHARDS, OPTIMIZER_SHARDS = "model-shards", "optimizer-shards"  # a sharded checkpoint's folders (sharded.py)


def is_sharded(checkpoint: Path) -> bool:
    """Whether `checkpoint` was written by a sharded run (its weights in MODEL_SHARDS, not model.safetensors)."""
    return (Path(checkpoint) / MODEL_SHARDS).is_dir()


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
    tensors = {f"{name}::{key}": value.detach().cpu().contiguous()
               for name, per_param in optimizer_state["state"].items() for key, value in per_param.items()}
    save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    return _publish(run_dir, step, tmp, {**state, "param_groups": optimizer_state["param_groups"]}, tokenizer, keep)


def save_sharded_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                            state: dict, tokenizer: TextTokenizer, keep: int) -> None:
    """save_checkpoint for a sharded model: every rank writes its own shards (nothing is gathered), then rank 0
    adds the small files and renames the folder into place. Every rank calls it."""
    from .sharded import write_shards  # here: torch.distributed.checkpoint is slow to import

    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    write_shards(tmp, model, optimizer)
    dist.barrier()  # every rank's shards are on disk before rank 0 seals and renames the folder
    if main:
        config = {**model.cfg.to_hf(), "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _publish(run_dir, step, tmp, {**state, "param_groups": named_param_groups(model, optimizer)}, tokenizer,
                 keep)


def save_tokenizer(folder: Path, tokenizer: TextTokenizer) -> None:
    """The tokenizer files and generation_config.json of a model folder."""
    tokenizer.save(folder)
    # transformers' generate, vLLM and SGLang stop where this says: at the end of the assistant's turn too
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.token_id(END_OF_TURN)]}, indent=2) + "\n")


def _publish(run_dir: Path, step: int, tmp: Path, trainer_state: dict, tokenizer: TextTokenizer, keep: int) -> Path:
    """Complete checkpoint folder `tmp` (tokenizer, trainer state, checksums), rename it to its final name, point
    RUN_DIR/latest at it, and drop old checkpoints."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    save_tokenizer(tmp, tokenizer)
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}) + "\n")
    seal(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = run_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.relative_to(run_dir))
    os.replace(link, run_dir / "latest")
    # checkpoints past this step are damaged ones that resuming skipped: this run rewrites those steps, so they go
    # now rather than count toward `keep` and push out intact ones
    done = sorted((int(p.name[5:]), p) for p in final.parent.glob("step-*") if p.name[5:].isdigit())
    for old in [p for s, p in done if s > step] + [p for s, p in done if s <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()  # gathers a sharded DTensor


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {parameter name: {key: tensor}}, "param_groups": [...]} with sharded tensors gathered and
    parameters named, so that it loads whatever the sharding; every rank must call it."""
    named = list(model.named_parameters())
    state = {n: {k: _full(v) for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
             for n, p in named if p in optimizer.state}
    return {"state": state, "param_groups": named_param_groups(model, optimizer)}


def named_param_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's hyperparameters per group, its parameters named."""
    names = {id(p): n for n, p in model.named_parameters()}  # by identity: DTensor equality is elementwise
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


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


_reported: set[str] = set()  # damaged checkpoints already named on stderr by this process


def _newest_intact(run_dir: Path, action: str) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies; each damaged one skipped is named on stderr (once)."""
    folder = run_dir / "checkpoints"
    steps = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    damaged = []
    for path in sorted(steps, key=lambda p: int(p.name[5:]), reverse=True):
        if not (path / CHECKSUMS).is_file() and not (path / "trainer_state.json").is_file():
            continue  # unsealed and without trainer state: no checkpoint a run could resume from
        try:
            verify(path)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for reason in damaged:
            if reason not in _reported and os.environ.get("RANK", "0") == "0":
                print(f"leanseek: {reason}; {action} {path.name}", file=sys.stderr)
            _reported.add(reason)
        return path
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {folder}: " + "; ".join(damaged)
                              + " (move the damaged ones away to start afresh)")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies (see integrity.verify), falling back past damaged ones;
    leftovers of an interrupted save are removed. Raises CheckpointError when every checkpoint is damaged."""
    for tmp in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return _newest_intact(run_dir, "resuming from")


def checkpoint_of(path: Path) -> Path:
    """A checkpoint folder: `path` itself, verified, or a run folder's newest intact checkpoint."""
    if (path / "config.json").is_file() or (path / CHECKSUMS).is_file():
        verify(path)
        return path
    found = _newest_intact(path, "using") if path.is_dir() else None
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
    `keys` are unchanged. Returns (step, the saved cost ledger's fields). Either kind of checkpoint restores into
    a sharded or a whole model; every rank calls it."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    changed = {k: (state["args"].get(k), run_args.get(k)) for k in keys if state["args"].get(k) != run_args.get(k)}
    if changed:
        raise ValueError(f"{checkpoint.parent.parent} holds a run made with other settings; changed: "
                         + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if is_sharded(checkpoint):
        from .sharded import load_optimizer_shards  # here: torch.distributed.checkpoint is slow to import

        load_optimizer_shards(checkpoint, model, optimizer)
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    else:
        load_optimizer_state(model, optimizer, load_trainer_state(checkpoint)[1])
    set_rng_state(state["rng"])
    return state["step"], state["ledger"]
