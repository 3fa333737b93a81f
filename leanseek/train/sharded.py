"""Sharded checkpoints: each rank of an FSDP run writes its own shards of the weights and optimizer state, and
nothing is gathered on one rank (torch.distributed.checkpoint, DCP).

CHECKPOINT/model-shards/shard-0000N-model-00001-of-00001.safetensors       one file per rank (N = rank + 1)
CHECKPOINT/optimizer-shards/shard-0000N-model-00001-of-00001.safetensors

The files are safetensors (DCP's Hugging Face storage): each records where its pieces sit in the whole tensors, so
reading needs no pickled metadata, and any number of processes (one included, without a process group) can load
them: DCP cuts the saved pieces to the reader's own sharding. Tensor names are leanseek's state-dict keys, not the
Hugging Face ones; `leanseek export` turns such a checkpoint into a Hugging Face folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ..model.config import ModelConfig
from ..model.hf import CheckpointError
from ..model.transformer import Transformer
from .checkpoint import MODEL_SHARDS, OPTIMIZER_SHARDS


def write_shards(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shards of the weights and of the optimizer state under `folder`; every rank calls it."""
    dcp.save(model.state_dict(), storage_writer=HuggingFaceStorageWriter(str(folder / MODEL_SHARDS),
                                                                           save_distributed=True))
    # tensors only (hyperparameters go to trainer_state.json): DCP would pickle anything else
    state = get_optimizer_state_dict(model, optimizer)["state"]
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder / OPTIMIZER_SHARDS), save_distributed=True))


def _load(state: dict, folder: Path, single: bool = False) -> None:
    """Fill the tensors of `state` in place from the shards in `folder` (cut to their own sharding)."""
    with warnings.catch_warnings():  # DCP warns when it loads without a process group, which is what single means
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=single)
        except (CheckpointException, RuntimeError) as e:  # a missing tensor, a wrong shape
            raise CheckpointError(f"{folder} does not hold the shards this model needs: {e}") from None


def load_model_shards(checkpoint: Path, model: Transformer) -> None:
    """Load the weights into `model` (sharded or not, allocated); every rank calls it."""
    _load(model.state_dict(), Path(checkpoint) / MODEL_SHARDS)


def load_optimizer_shards(checkpoint: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state (tensors; the caller restores hyperparameters); every rank calls it."""
    state = get_optimizer_state_dict(model, optimizer)  # allocates the state (a step at lr 0) to load into
    _load(state["state"], Path(checkpoint) / OPTIMIZER_SHARDS)
    set_optimizer_state_dict(model, optimizer, state)


def read_sharded_model(checkpoint: Path, cfg: ModelConfig, dtype: torch.dtype,
                       device: torch.device | str) -> Transformer:
    """The whole model of a sharded checkpoint, in this process alone (no process group needed): load_hf's reader
    for sharded checkpoints."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state = model.state_dict()
    _load(state, Path(checkpoint) / MODEL_SHARDS, single=True)
    # as load_hf does: the routing bias stays float32 whatever the weights' dtype
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32 if k.endswith("e_score_correction_bias")
                                   else dtype) for k, v in state.items()}, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rotary(device)
    return model.eval()
