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

from ..model.hf import save_hf
from ..model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict, data_dir: Path, keep: int) -> Path:
    """Write checkpoint `step` atomically, point RUN_DIR/latest at it, and keep only the newest `keep`."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp)
    for name in TOKENIZER_FILES:
        shutil.copy2(data_dir / name, tmp / name)
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer": meta, "step": step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = run_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.relative_to(run_dir))
    os.replace(link, run_dir / "latest")
    for old in sorted(p for p in final.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; leftovers of an interrupted save are removed."""
    folder = run_dir / "checkpoints"
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer from checkpoint `path` and return its trainer state (step, RNG, ledger, ...)."""
    state = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for name, t in tensors.items():
        i, key = name.split(".", 1)
        per_param.setdefault(int(i), {})[key] = t
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    return state
