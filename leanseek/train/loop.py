"""`leanseek pretrain` and `leanseek sft`: train a DeepSeek-V3-style model on one CPU or many GPUs; pretraining
from scratch on tokenized shards, SFT from a checkpoint on chats (the loss on the assistant's tokens only).

The objective is V3's (report section 4.2): next-token loss + lambda x MTP loss + alpha x sequence-wise balance loss,
with the auxiliary-loss-free bias update after every optimizer step. AdamW (0.9, 0.95), gradient clipping at 1.0,
warmup -> constant -> linear decay. Running the same command on the same RUN_DIR resumes from the newest checkpoint
and reproduces the uninterrupted run exactly. Under torchrun it trains data-parallel: DDP, or FSDP2 with --fsdp.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..atomic import write_text_atomic
from ..console import metrics_line
from ..data import TextTokenizer, load_split
from ..device import add_device_arguments, default_price, use_device
from ..model.config import ModelConfig
from ..model.hf import load_hf, read_config
from ..model.indexer import Indexer
from ..model.moe import Experts, Router
from ..model.transformer import Transformer
from .balance import max_violation, update_correction_bias
from .checkpoint import (checkpoint_of, full_optimizer_state, is_sharded, latest_checkpoint, restore, rng_state,
                         save_checkpoint, save_sharded_checkpoint)
from .cost import Ledger, detect_peak_tflops
from .loader import WindowSampler, eval_windows
from .losses import IGNORE_INDEX, training_loss
from .sft import sft_streams

# arguments that decide what a step computes: a resumed run must use the same ones
RESUME_KEYS = ("preset", "set", "batch_size", "seq_len", "seed", "lr", "warmup_steps", "decay_frac", "weight_decay",
               "mtp_weight", "balance_weight", "bias_update_speed", "data", "init", "train", "indexer_weight")


def add_arguments(p: argparse.ArgumentParser, stage: str = "pretrain") -> None:
    p.set_defaults(stage=stage)
    g = p.add_argument_group("data and output")
    if stage == "sft":
        g.add_argument("--init", required=True, help="the run folder (or checkpoint) to start from")
        g.add_argument("--data", required=True,
                       help="OpenAI messages JSONL (one {\"messages\": [...]} per line), or `builtin`")
    else:
        g.add_argument("--data", required=True, help="a folder made by `leanseek data`")
    g.add_argument("--out", required=True, help="run folder: checkpoints/, latest, metrics.jsonl, cost.json")
    if stage == "pretrain":
        g.add_argument("--init", help="continue from this run folder or checkpoint: its weights and config (changed "
                                      "by --set; index_n_heads=N adds DeepSeek-V3.2's indexers, which start fresh), "
                                      "a fresh optimizer")
        g = p.add_argument_group("model")
        g.add_argument("--preset", default="tiny", help="the model to build (not with --init)")
        g.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000 if stage == "pretrain" else 300)
    g.add_argument("--batch-size", type=int, default=16, help="global batch, sequences per optimizer step")
    g.add_argument("--micro-batch-size", type=int, help="sequences per device per micro-step (default: all)")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=2e-3 if stage == "pretrain" else 1e-3)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps, at most 200")
    g.add_argument("--decay-frac", type=float, default=0.2, help="final fraction of steps decaying to 10%% of lr")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--mtp-weight", type=float, default=0.3, help="lambda of the MTP loss (V3: 0.3, then 0.1)")
    g.add_argument("--train", default="all", choices=["all", "mtp", "indexer"],
                   help="what learns: all; mtp: the MTP modules alone on their own loss, everything else frozen "
                        "(fits the drafts to a model trained without the MTP loss, for a fraction of a full step); "
                        "indexer: a sparse-attention (DeepSeek-V3.2) model's indexers alone, against the dense "
                        "attention (the warm-up that precedes sparse training)")
    g.add_argument("--indexer-weight", type=float, default=1.0,
                   help="weight of the sparse-attention indexers' KL loss (it trains the indexers only)")
    g.add_argument("--balance-weight", type=float, default=1e-4, help="alpha of the sequence-wise balance loss")
    g.add_argument("--bias-update-speed", type=float, default=1e-3, help="gamma of the aux-loss-free bias update")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--optimizer-impl", default="auto", choices=["auto", "fused", "foreach", "for-loop"],
                   help="AdamW's kernels: fused (auto's choice on CPUs and CUDA), foreach or for-loop")
    g = p.add_argument_group("runtime")
    add_device_arguments(g)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bf16 autocast; auto: on GPUs, not on CPUs (faster only with AMX)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, shard parameters, gradients and optimizer "
                                                       "state over ranks (FSDP2) instead of replicating them (DDP)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log every metric for TensorBoard in RUN_DIR/tensorboard (pip install tensorboard)")
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--eval-every", type=int, default=200)
    g.add_argument("--eval-tokens", type=int, default=65536)
    g.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: detected)")
    g.add_argument("--price", type=float, help="dollars per device-hour (default: leanseek.device's price for the "
                                               "device)")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def lr_at(step: int, args) -> float:
    """Linear warmup, constant, then linear decay to 10% over the last decay_frac of the steps."""
    warmup = args.warmup_steps if args.warmup_steps is not None else min(200, max(1, args.steps // 20))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    decay_start = int(args.steps * (1 - args.decay_frac))
    if step < decay_start:
        return args.lr
    return args.lr * (1 - 0.9 * (step - decay_start + 1) / max(1, args.steps - decay_start))


class Objective(nn.Module):
    """The training loss as a module, so that the data-parallel wrapper's hooks see everything the loss touches
    (the loss uses the output head's weight outside the head's own forward): DDP's around the whole forward,
    FSDP's all-gather of the embedding, final norm and head as the root of the sharded modules."""

    def __init__(self, model: Transformer, mtp_weight: float, balance_weight: float, index_weight: float = 0.0,
                 dense: bool = False, main: bool = True):
        super().__init__()
        self.model, self.mtp_weight, self.balance_weight = model, mtp_weight, balance_weight
        self.index_weight, self.dense, self.main = index_weight, dense, main

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        t = training_loss(self.model, x, y, self.mtp_weight, self.balance_weight, self.index_weight, self.dense,
                          self.main)
        return t.loss, t.ce, t.mtp, t.balance, t.index, t.load

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The main head's logits (for evaluation); under FSDP a forward method of the root like `forward`."""
        return self.model(x)


def token_bytes(tokenizer: TextTokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for (0 for special tokens); byte-level BPE writes one character per byte."""
    special = set(tokenizer.tk.get_added_tokens_decoder())
    return torch.tensor([0 if i in special else len(tokenizer.tk.id_to_token(i)) for i in range(tokenizer.vocab_size)])


@torch.no_grad()
def evaluate(objective: Objective, x: torch.Tensor, y: torch.Tensor, nbytes: torch.Tensor, device,
             autocast) -> dict:
    """Validation loss (nats per token) and bits per byte, special-token and ignored targets excluded."""
    objective.eval()
    nats, tokens, total_bytes = 0.0, 0, 0
    for start in range(0, len(x), 8):
        xb, yb = x[start:start + 8].to(device), y[start:start + 8].to(device)
        with autocast():
            logits = objective.logits(xb)
        b = nbytes.to(device)[yb.clamp(min=0)] * (yb != IGNORE_INDEX)
        ce = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX).view_as(yb)
        nats += float((ce * (b > 0)).sum())
        tokens += int((b > 0).sum())
        total_bytes += int(b.sum())
    objective.train()
    return {"val_loss": nats / max(tokens, 1), "val_bpb": nats / math.log(2) / max(total_bytes, 1)}


def unigram_bpb(train: np.ndarray, y: torch.Tensor, nbytes: torch.Tensor, vocab: int) -> float:
    """Bits per byte of the best context-free model (training-set token frequencies) on the validation targets."""
    counts = np.bincount(train[: 50_000_000], minlength=vocab).astype(np.float64) + 1  # add-one smoothing
    logp = torch.from_numpy(np.log(counts / counts.sum()))
    b = nbytes[y]
    return float(-(logp[y] * (b > 0)).sum() / math.log(2) / b.sum())


# ---------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Place:
    """Where this process trains: rank `rank` of `world` processes, on `device`; `sharded`: FSDP, else (when
    world > 1) DDP."""

    rank: int
    world: int
    device: torch.device
    sharded: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(args) -> Place:
    """Threads, device and, under torchrun, the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Place(0, 1, use_device(args), False)
    device = use_device(args, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Place(dist.get_rank(), world, device, args.fsdp)


@dataclasses.dataclass
class Corpus:
    tokenizer: TextTokenizer
    train: np.ndarray
    val: np.ndarray
    train_mask: np.ndarray | None = None  # SFT: which targets count (the assistant's); pretraining: all of them
    val_mask: np.ndarray | None = None


def load_corpus(args) -> Corpus:
    if args.stage == "sft":
        tokenizer = TextTokenizer.load(checkpoint_of(Path(args.init)))
        (train, train_mask), (val, val_mask) = sft_streams(tokenizer, args.data, args.seed, args.seq_len)
        return Corpus(tokenizer, train, val, train_mask, val_mask)
    return Corpus(TextTokenizer.load(args.data), load_split(args.data, "train")[0], load_split(args.data, "val")[0])


def build_model(args, tokenizer: TextTokenizer, resume: Path | None, place: Place) -> Transformer:
    """The model to train: the checkpoint being resumed, SFT's starting point, or a fresh seeded one. When a
    sharded run resumes a sharded checkpoint, on the meta device: its shards are loaded after sharding (no rank
    ever holds the whole model). A fresh sharded model is built on the CPU, and sharding moves it to the device one
    unit at a time."""
    if resume is not None and place.sharded and is_sharded(resume):
        with torch.device("meta"):
            return Transformer(read_config(resume)).train()
    if resume is not None or args.stage == "sft":
        return load_hf(resume or checkpoint_of(Path(args.init)), device=place.device).train()
    if args.init:
        return continued(args, place)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset(args.preset, **{"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
                                             "eos_token_id": tokenizer.eos_id, **parse_overrides(args.set)})
    return Transformer(cfg).to("cpu" if place.sharded else place.device).train()


def continued(args, place: Place) -> Transformer:
    """`leanseek pretrain --init`: the checkpoint's model with its config changed by --set. Sparse attention's
    indexers may be added (they start from the usual initialisation) or dropped; every other weight must keep its
    shape."""
    base = load_hf(checkpoint_of(Path(args.init)))
    cfg = base.cfg.replace(**parse_overrides(args.set))
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    theirs, ours = base.state_dict(), model.state_dict()
    changed = [k for k in (set(ours) ^ set(theirs)) if ".indexer." not in k]
    changed += [k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape]
    if changed:
        raise ValueError(f"--init {args.init} with --set {' '.join(args.set)}: the weights {sorted(changed)[:4]} "
                         "would change shape or go; only sparse attention's indexers can be added or dropped")
    model.load_state_dict({k: v for k, v in theirs.items() if k in ours}, strict=False)
    return model.to("cpu" if place.sharded else place.device).train()


def shard(objective: Objective, place: Place, bf16: bool = False) -> None:
    """FSDP2 as torchtitan applies it: each decoder block and MTP module is a unit (all-gathered just before its
    forward and again for its backward, freed after each), and the objective is the root unit, holding the rest
    (embedding, final norm, output head). Parameters, gradients and optimizer state are then all sharded.

    bf16: the units gather their parameters in bf16 (FSDP's mixed precision; gradients reduced in float32). Under
    autocast alone each rank would keep a bf16 copy of every gathered weight, saved for the backward, until the
    backward: a whole model's worth. The routers gather in float32 (V3 report section 3.3)."""
    # imported here: slow to import, and needed only when sharding
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(place.device.type, (place.world,))
    model = objective.model
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    if bf16:
        for module in model.modules():
            if isinstance(module, Router):
                fully_shard(module, mesh=mesh, reshard_after_forward=True,
                            mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    for unit in [*model.layers, *model.mtp]:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=compute)
    # reshard_after_forward on the root too: an evaluation (a forward with no backward) then leaves nothing gathered
    fully_shard(objective, mesh=mesh, reshard_after_forward=True, mp_policy=compute)
    register_fsdp_forward_method(objective, "logits")


def wrap(objective: Objective, args, place: Place) -> nn.Module:
    """The module a training step calls: the objective, data-parallel (DDP) when replicated over ranks (FSDP wraps
    it in place, see shard), compiled with --compile."""
    forward: nn.Module = objective
    if place.world > 1 and not place.sharded:
        forward = nn.parallel.DistributedDataParallel(
            objective, broadcast_buffers=False,  # routing biases stay equal: every rank applies the same update
            find_unused_parameters=args.mtp_weight == 0 and objective.model.cfg.num_nextn_predict_layers > 0)
    if args.compile:
        for module in objective.modules():  # per-expert token counts change every step: leave the expert kernel
            if isinstance(module, Experts):  # uncompiled, or every step would recompile
                module.forward = torch.compiler.disable(module.forward)
        forward = torch.compile(forward)
    return forward


def optimizer_options(impl: str, device: torch.device) -> dict:
    """AdamW's implementation: fused (the whole update in one kernel over many tensors; CPUs and CUDA, sharded
    DTensors included), foreach (one kernel per operation over many tensors), or for-loop (tensor by tensor)."""
    if impl == "auto":
        impl = "fused" if device.type in ("cpu", "cuda") else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]


def build_optimizer(model: Transformer, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) over the parameters that learn, weight decay on matrices other than the embedding."""
    learning = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in learning if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in learning if not (p.ndim >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                             **optimizer_options(args.optimizer_impl, device))


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds for parameters, gradients and optimizer state: under FSDP its shards only."""
    return storage_bytes([*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                          *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))])


def storage_bytes(tensors) -> int:
    """The bytes of memory behind `tensors` (of a DTensor: its local shard), storage shared by several (FSDP's
    gradient shards are views of one buffer) counted once."""
    storages = {}
    for t in tensors:
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------- training


def accumulate(forward: nn.Module, objective: Objective, last: bool, sharded: bool):
    """Micro-steps before the last accumulate gradients locally; the last one synchronises them over ranks."""
    if sharded:
        objective.set_requires_gradient_sync(last)  # on FSDP's root: every unit below it too
    elif not last and hasattr(forward, "no_sync"):  # DDP (compiled or not)
        return forward.no_sync()
    return contextlib.nullcontext()


def train_step(forward: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, batches: list,
               place: Place, n_routers: int, autocast) -> tuple[list[float], torch.Tensor, float]:
    """One optimizer step over the global batch: gradient accumulation over this rank's micro-batches, clipping
    at 1.0, AdamW. Returns the global batch's mean (loss, ce, mtp, balance, index), the expert loads [n_routers, E]
    summed over it, and the gradient norm before clipping."""
    device = place.device
    sums = torch.zeros(5, device=device)
    load = torch.zeros(n_routers, objective.model.cfg.n_routed_experts, device=device)
    for m, (x, y) in enumerate(batches):
        with accumulate(forward, objective, m == len(batches) - 1, place.sharded):
            with autocast():
                loss, ce, mtp, balance, index, micro_load = forward(x.to(device), y.to(device))
            (loss / len(batches)).backward()
        sums += torch.stack([loss.detach(), ce, mtp, balance, index]) / len(batches)
        load += micro_load
    if place.world > 1:  # the bias update and the logged loss are over the global batch
        dist.all_reduce(load)
        dist.all_reduce(sums)
        sums /= place.world
    # FSDP's gradients are sharded DTensors: clip_grad_norm_ reduces their norms over ranks itself
    grad_norm = nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    return sums.tolist(), load, float(grad_norm)


def uses_bf16(args, device: torch.device) -> bool:
    """--dtype: bf16 (autocast; under FSDP, also bf16 gathers) when asked, or by default on GPUs."""
    return args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")


def run(args) -> dict:
    """Train; returns the final metrics line. See `leanseek pretrain --help`."""
    place = setup(args)
    corpus = load_corpus(args)
    run_dir = Path(args.out)
    device = place.device
    micro = args.micro_batch_size or args.batch_size // place.world
    if args.batch_size % (place.world * micro):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of world size x --micro-batch-size "
                         f"= {place.world} x {micro}")
    accumulation = args.batch_size // (place.world * micro)
    use_bf16 = uses_bf16(args, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
    resume = latest_checkpoint(run_dir) if run_dir.exists() else None
    objective, forward = prepare_model(args, corpus.tokenizer, resume, place)
    model, cfg = objective.model, objective.model.cfg
    optimizer = build_optimizer(model, args, device)
    peak = args.peak_tflops or detect_peak_tflops(device, torch.bfloat16 if use_bf16 else torch.float32)[0]
    price = args.price if args.price is not None else default_price(device)
    ledger = Ledger(devices=place.world, peak_tflops=peak, price_per_device_hour=price)
    start = 0
    if resume is not None:
        start, saved = restore(resume, run_args, RESUME_KEYS, model, optimizer)
        ledger = Ledger(**{**saved, "devices": place.world, "peak_tflops": peak, "price_per_device_hour": price})

    sampler = WindowSampler(corpus.train, args.seq_len, args.batch_size, args.seed, corpus.train_mask)
    val_x, val_y = eval_windows(corpus.val, args.seq_len, args.eval_tokens, corpus.val_mask)
    nbytes = token_bytes(corpus.tokenizer)
    if args.train == "mtp":
        flops_per_token = cfg.mtp_training_flops_per_token(args.seq_len)
    elif args.train == "indexer":
        flops_per_token = cfg.indexer_training_flops_per_token(args.seq_len, args.mtp_weight > 0)
    else:
        flops_per_token = cfg.flops_per_token(args.seq_len, include_mtp=args.mtp_weight > 0)
    # the output head's training FLOPs per position, counted only where there is a target (the loss skips the rest)
    heads = {"all": 1 + (cfg.num_nextn_predict_layers if args.mtp_weight > 0 else 0),
             "mtp": cfg.num_nextn_predict_layers, "indexer": 0}[args.train]
    head_flops = cfg.head_flops_per_token() * heads
    first = {}  # on the first line of a fresh run: the untrained model's and a unigram model's bits per byte
    if start == 0:
        first = {f"initial_{k}": v for k, v in evaluate(objective, val_x, val_y, nbytes, device, autocast).items()}
        if args.stage != "sft":
            first["unigram_val_bpb"] = unigram_bpb(corpus.train, val_y, nbytes, cfg.vocab_size)
    log = Log(run_dir, args, start, place.main)
    routers = model.routers(mtp=args.mtp_weight > 0)  # MTP modules do not run when their loss is off
    # the routers whose biases stay as they are: the main model's when only the MTP modules learn, all of them when
    # only the indexers do
    frozen = {"all": 0, "mtp": len(model.routers(mtp=False)), "indexer": len(routers)}[args.train]
    line: dict = {}
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batches = sampler.micro_batches(step, place.rank, place.world, accumulation)
        (loss, ce, mtp, balance, index), load, grad_norm = train_step(forward, objective, optimizer, batches, place,
                                                               len(routers), autocast)
        if step == start:  # what data parallelism saves, on the first line this process logs
            first["state_bytes_per_device"] = largest_over_ranks(state_bytes(model, optimizer), place)
        optimizer.zero_grad(set_to_none=True)
        if routers[frozen:]:
            update_correction_bias(routers[frozen:], load[frozen:], args.bias_update_speed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tokens = args.batch_size * args.seq_len
        unlearned = sum(int((y == IGNORE_INDEX).sum()) for _, y in batches) / sum(y.numel() for _, y in batches)
        step_flops = (flops_per_token - head_flops * unlearned) * tokens
        ledger.wall_seconds += dt
        ledger.tokens += tokens
        ledger.flops += step_flops
        vio = max_violation(load) if routers else torch.zeros(1)
        line = {"step": step + 1, "loss": loss, "ce": ce, "mtp": mtp, "balance": balance,
                "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                "mfu": step_flops / dt / (peak * 1e12 * place.world), "maxvio": float(vio.mean()),
                "maxvio_max": float(vio.max()), "seconds": dt, **first}
        if cfg.has_indexer:
            line["index"] = index
        if not objective.main:  # --train mtp: the main loss is not computed (training_loss)
            del line["ce"]
        first = {}
        done = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or done:
            line.update(evaluate(objective, val_x, val_y, nbytes, device, autocast))
        log.write(line)
        if (step + 1) % args.save_every == 0 or done:
            save(run_dir, step + 1, model, optimizer, run_args, ledger, corpus.tokenizer, args.keep, place)
    log.close()
    if place.world > 1:
        dist.destroy_process_group()
    if line and place.main:
        print(metrics_line(line))
        print(f"checkpoints: {run_dir}/checkpoints, newest: {run_dir}/latest"
              + (" (sharded: `leanseek export` writes a Hugging Face folder)" if place.sharded
                 else " (a Hugging Face model folder)"))
    return line


def prepare_model(args, tokenizer: TextTokenizer, resume: Path | None, place: Place) -> tuple[Objective, nn.Module]:
    """The model, built or loaded (build_model), inside its objective, sharded or replicated over ranks. Returns
    (the objective, the module a training step calls: see wrap)."""
    model = build_model(args, tokenizer, resume, place)
    if args.seq_len > model.cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings="
                         f"{model.cfg.max_position_embeddings}")
    if args.train == "mtp":
        if not model.mtp or args.mtp_weight <= 0:
            raise ValueError("--train mtp: needs MTP modules (num_nextn_predict_layers > 0) and --mtp-weight > 0; "
                             f"this model has {len(model.mtp)} and --mtp-weight is {args.mtp_weight}")
        learn_only(model, model.mtp)
    if args.train == "indexer":
        if not model.cfg.sparse_attention or args.indexer_weight <= 0:
            raise ValueError("--train indexer: needs a sparse-attention model (index_n_heads > 0) and "
                             f"--indexer-weight > 0; this model has index_n_heads={model.cfg.index_n_heads} and "
                             f"--indexer-weight is {args.indexer_weight}")
        learn_only(model, *(m for m in model.modules() if isinstance(m, Indexer)))
    objective = Objective(model, args.mtp_weight, args.balance_weight, args.indexer_weight,
                          dense=args.train == "indexer", main=args.train != "mtp")
    if place.sharded:  # before the optimizer exists: sharding replaces the parameters
        shard(objective, place, bf16=uses_bf16(args, place.device))
    if model.embed_tokens.weight.is_meta:  # a sharded checkpoint's: allocate this rank's shards, then read them
        from .sharded import load_model_shards  # here: torch.distributed.checkpoint is slow to import

        objective.to_empty(device=place.device)
        model.reset_rotary(place.device)
        load_model_shards(resume, model)
    return objective, wrap(objective, args, place)


def learn_only(model: Transformer, *modules: nn.Module) -> None:
    """Freeze every parameter of the model but those of `modules` (`--train mtp`, `--train indexer`)."""
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)


def largest_over_ranks(value: int, place: Place) -> int:
    if place.world == 1:
        return value
    t = torch.tensor([value], device=place.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


class Log:
    """Rank 0 writes each step's metrics line to RUN_DIR/metrics.jsonl (and TensorBoard) and shows a progress bar;
    lines past `start` that a killed run logged are dropped first."""

    def __init__(self, run_dir: Path, args, start: int, main: bool):
        self.path, self.main, self.writer = run_dir / "metrics.jsonl", main, None
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, start)
            if args.tensorboard:
                self.writer = tensorboard_writer(run_dir, start)
        self.bar = tqdm(initial=start, total=args.steps, desc=args.stage,
                        disable=None if main else True)  # None: shown on terminals only

    def write(self, line: dict) -> None:
        self.bar.update()
        if not self.main:
            return
        append_metrics(self.path, line)
        if self.writer is not None:
            for key, value in line.items():
                if key != "step":
                    self.writer.add_scalar(key, value, line["step"])
        loss = {"loss": line["ce"]} if "ce" in line else {"mtp_loss": line["mtp"]}  # --train mtp: no main loss
        self.bar.set_postfix({**{k: f"{v:.3f}" for k, v in loss.items()}, "tok_s": f"{line['tokens_per_s']:,.0f}",
                              "maxvio": f"{line['maxvio']:.2f}"})

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(run_dir: Path, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'leanseek[tensorboard]'") from None
    return SummaryWriter(run_dir / "tensorboard", purge_step=start + 1)  # drop what a killed run logged past it


def save(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, run_args: dict,
         ledger: Ledger, tokenizer: TextTokenizer, keep: int, place: Place) -> None:
    """Checkpoint `step`: sharded, every rank writing its own shards; else rank 0 writing the whole model."""
    state = {"args": run_args, "rng": rng_state(), "ledger": dataclasses.asdict(ledger)}
    if place.sharded:
        save_sharded_checkpoint(run_dir, step, model, optimizer, state, tokenizer, keep)
    elif place.main:
        save_checkpoint(run_dir, step, model, full_optimizer_state(model, optimizer), state, tokenizer, keep)
    if place.main:
        write_json(run_dir / "cost.json", ledger.summary())
    if place.world > 1:
        dist.barrier()


def append_metrics(path: Path, line: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past the checkpoint being resumed (a killed run may have logged steps it never saved)."""
    if not path.exists():
        return
    keep = []
    for raw in path.read_text().splitlines():
        try:
            if json.loads(raw)["step"] <= step:
                keep.append(raw)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by the kill
    write_text_atomic(path, "".join(k + "\n" for k in keep))
