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
from ..data import TextTokenizer, load_split
from ..model.config import ModelConfig
from ..model.hf import load_hf
from ..model.moe import Experts
from ..model.transformer import Transformer
from .balance import max_violation, update_correction_bias
from .checkpoint import (checkpoint_of, full_model_state, full_optimizer_state, latest_checkpoint, restore,
                         rng_state, save_checkpoint)
from .cost import Ledger, detect_peak_tflops
from .loader import WindowSampler, eval_windows
from .losses import IGNORE_INDEX, training_loss
from .sft import sft_streams

# arguments that decide what a step computes: a resumed run must use the same ones
RESUME_KEYS = ("preset", "set", "batch_size", "seq_len", "seed", "lr", "warmup_steps", "decay_frac", "weight_decay",
               "mtp_weight", "balance_weight", "bias_update_speed", "data", "init")


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
        g = p.add_argument_group("model")
        g.add_argument("--preset", default="tiny")
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
    g.add_argument("--balance-weight", type=float, default=1e-4, help="alpha of the sequence-wise balance loss")
    g.add_argument("--bias-update-speed", type=float, default=1e-3, help="gamma of the aux-loss-free bias update")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("runtime")
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
    g.add_argument("--price", type=float, help="dollars per device-hour (default: 2 on GPUs, 0.05 on CPUs)")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's)")


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
    """The training loss as a module, so that DDP's gradient hooks see the whole forward."""

    def __init__(self, model: Transformer, mtp_weight: float, balance_weight: float):
        super().__init__()
        self.model, self.mtp_weight, self.balance_weight = model, mtp_weight, balance_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        t = training_loss(self.model, x, y, self.mtp_weight, self.balance_weight)
        return t.loss, t.ce, t.mtp, t.balance, t.load


def clip_gradients(params: list[nn.Parameter], max_norm: float, sharded: bool) -> float:
    """Scale gradients to a global L2 norm of at most max_norm; returns the norm before clipping."""
    if not sharded:
        return float(nn.utils.clip_grad_norm_(params, max_norm))
    # sharded gradients (DTensors) and whole ones mixed: sum the squares, gathering each sharded norm
    squares = [p.grad.norm() ** 2 for p in params if p.grad is not None]
    total = math.sqrt(sum(float(s.full_tensor() if hasattr(s, "full_tensor") else s) for s in squares))
    scale = min(1.0, max_norm / (total + 1e-6))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    return total


def token_bytes(tokenizer: TextTokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for (0 for special tokens); byte-level BPE writes one character per byte."""
    special = set(tokenizer.tk.get_added_tokens_decoder())
    return torch.tensor([0 if i in special else len(tokenizer.tk.id_to_token(i)) for i in range(tokenizer.vocab_size)])


@torch.no_grad()
def evaluate(model: Transformer, x: torch.Tensor, y: torch.Tensor, nbytes: torch.Tensor, device, autocast) -> dict:
    """Validation loss (nats per token) and bits per byte, special-token and ignored targets excluded."""
    model.eval()
    nats, tokens, total_bytes = 0.0, 0, 0
    for start in range(0, len(x), 8):
        xb, yb = x[start:start + 8].to(device), y[start:start + 8].to(device)
        with autocast():
            logits = model(xb)
        b = nbytes.to(device)[yb.clamp(min=0)] * (yb != IGNORE_INDEX)
        ce = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX).view_as(yb)
        nats += float((ce * (b > 0)).sum())
        tokens += int((b > 0).sum())
        total_bytes += int(b.sum())
    model.train()
    _reshard(model)
    return {"val_loss": nats / max(tokens, 1), "val_bpb": nats / math.log(2) / max(total_bytes, 1)}


def unigram_bpb(train: np.ndarray, y: torch.Tensor, nbytes: torch.Tensor, vocab: int) -> float:
    """Bits per byte of the best context-free model (training-set token frequencies) on the validation targets."""
    counts = np.bincount(train[: 50_000_000], minlength=vocab).astype(np.float64) + 1  # add-one smoothing
    logp = torch.from_numpy(np.log(counts / counts.sum()))
    b = nbytes[y]
    return float(-(logp[y] * (b > 0)).sum() / math.log(2) / b.sum())


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", local) if cuda else torch.device("cpu")


def run(args) -> dict:
    """Train; returns the final metrics line. See `leanseek pretrain --help`."""
    rank, world, device = _setup_distributed()
    main_rank = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    sft = args.stage == "sft"
    run_dir = Path(args.out)
    train_mask = val_mask = None  # pretraining learns every token
    if sft:
        init = checkpoint_of(Path(args.init))
        tokenizer = TextTokenizer.load(init)
        (train_tokens, train_mask), (val_tokens, val_mask) = sft_streams(tokenizer, args.data, args.seed)
    else:
        tokenizer = TextTokenizer.load(args.data)
        train_tokens, _ = load_split(args.data, "train")
        val_tokens, _ = load_split(args.data, "val")
    micro = args.micro_batch_size or args.batch_size // world
    if args.batch_size % (world * micro):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of world size x --micro-batch-size "
                         f"= {world} x {micro}")
    accumulation = args.batch_size // (world * micro)
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
    resume = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume is not None:
        model = load_hf(resume, device=device)
        model.train()
    elif sft:
        model = load_hf(init, device=device).train()
    else:
        torch.manual_seed(args.seed)
        cfg = ModelConfig.preset(args.preset, **{"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
                                                 "eos_token_id": tokenizer.eos_id, **parse_overrides(args.set)})
        model = Transformer(cfg).to(device).train()
    cfg = model.cfg
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    sharded = world > 1 and args.fsdp
    replicated = []  # with FSDP: parameters whose gradients this loop averages over ranks itself
    if sharded:  # before the optimizer exists: sharding replaces the parameters
        from torch.distributed.fsdp import fully_shard

        # each decoder block (and MTP module) is sharded; the embedding, final norm and head stay whole on every
        # rank, as the loss uses the head's weight outside any module's forward
        for block in [*model.layers, *model.mtp]:
            fully_shard(block)
        in_blocks = {id(p) for block in [*model.layers, *model.mtp] for p in block.parameters()}
        replicated = [p for p in model.parameters() if id(p) not in in_blocks]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                                  fused=device.type in ("cpu", "cuda") and not sharded)
    peak = args.peak_tflops or detect_peak_tflops(device, torch.bfloat16 if use_bf16 else torch.float32)[0]
    price = args.price if args.price is not None else (2.0 if device.type == "cuda" else 0.05)
    ledger = Ledger(devices=world, peak_tflops=peak, price_per_device_hour=price)
    start = 0
    if resume is not None:
        start, saved = restore(resume, run_args, RESUME_KEYS, model, optimizer)
        ledger = Ledger(**{**saved, "devices": world, "peak_tflops": peak, "price_per_device_hour": price})

    objective = Objective(model, args.mtp_weight, args.balance_weight)
    if world > 1 and not sharded:
        objective = nn.parallel.DistributedDataParallel(
            objective, broadcast_buffers=False,  # routing biases stay equal: every rank applies the same update
            find_unused_parameters=args.mtp_weight == 0 and cfg.num_nextn_predict_layers > 0)
    if args.compile:
        for module in model.modules():  # per-expert token counts change every step: leave the expert kernel
            if isinstance(module, Experts):  # uncompiled, or every step would recompile
                module.forward = torch.compiler.disable(module.forward)
        objective = torch.compile(objective)

    sampler = WindowSampler(train_tokens, args.seq_len, args.batch_size, args.seed, train_mask)
    val_x, val_y = eval_windows(val_tokens, args.seq_len, args.eval_tokens, val_mask)
    nbytes = token_bytes(tokenizer)
    flops_per_token = cfg.flops_per_token(args.seq_len, include_mtp=args.mtp_weight > 0)
    metrics_path = run_dir / "metrics.jsonl"
    baselines = {}  # on the first line of a fresh run: the untrained model's and a unigram model's bits per byte
    if start == 0:
        baselines = {f"initial_{k}": v for k, v in evaluate(model, val_x, val_y, nbytes, device, autocast).items()}
        if not sft:
            baselines["unigram_val_bpb"] = unigram_bpb(train_tokens, val_y, nbytes, cfg.vocab_size)
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start)
    writer = None
    if args.tensorboard and main_rank:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: "
                             "pip install 'leanseek[tensorboard]'") from None
        writer = SummaryWriter(run_dir / "tensorboard", purge_step=start + 1)  # drop what a killed run logged past it
    routers = model.routers(mtp=args.mtp_weight > 0)  # MTP modules do not run when their loss is off
    line: dict = {}
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.stage,
               disable=None if main_rank else True)  # None: shown on terminals only
    for step in bar:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        sums = torch.zeros(4, device=device)
        load = torch.zeros(len(routers), cfg.n_routed_experts, device=device)
        for m, (x, y) in enumerate(sampler.micro_batches(step, rank, world, accumulation)):
            last = m == accumulation - 1
            if sharded:  # reduce-scatter gradients on the last micro-step only
                for block in [*model.layers, *model.mtp]:
                    block.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or not hasattr(objective, "no_sync") else objective.no_sync()
            with sync:
                with autocast():
                    loss, ce, mtp, balance, micro_load = objective(x.to(device), y.to(device))
                (loss / accumulation).backward()
            sums += torch.stack([loss.detach(), ce, mtp, balance]) / accumulation
            load += micro_load
        if world > 1:  # the bias update and the logged loss are over the global batch
            dist.all_reduce(load)
            dist.all_reduce(sums)
            sums /= world
        if sharded:
            for p in replicated:
                dist.all_reduce(p.grad)
                p.grad /= world
        grad_norm = clip_gradients(list(model.parameters()), 1.0, sharded)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if routers:
            update_correction_bias(routers, load, args.bias_update_speed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tokens = args.batch_size * args.seq_len
        ledger.wall_seconds += dt
        ledger.tokens += tokens
        ledger.flops += flops_per_token * tokens
        vio = max_violation(load) if routers else torch.zeros(1)
        loss_v, ce_v, mtp_v, bal_v = sums.tolist()
        line = {"step": step + 1, "loss": loss_v, "ce": ce_v, "mtp": mtp_v, "balance": bal_v,
                "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                "mfu": flops_per_token * tokens / dt / (peak * 1e12 * world), "maxvio": float(vio.mean()),
                "maxvio_max": float(vio.max()), "seconds": dt}
        line.update(baselines)
        baselines = {}
        done = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or done:
            line.update(evaluate(model, val_x, val_y, nbytes, device, autocast))
        if main_rank:
            append_metrics(metrics_path, line)
            for key, value in line.items():
                if writer is not None and key != "step":
                    writer.add_scalar(key, value, step + 1)
            bar.set_postfix(loss=f"{ce_v:.3f}", tok_s=f"{tokens / dt:,.0f}", maxvio=f"{line['maxvio']:.2f}")
        if (step + 1) % args.save_every == 0 or done:
            _save(run_dir, step + 1, model, optimizer, run_args, ledger, tokenizer, args.keep, main_rank, sharded)
    bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return line


def _save(run_dir, step, model, optimizer, run_args, ledger, tokenizer, keep, main_rank, sharded) -> None:
    # full (gathered) states: collectives when sharded, so every rank takes part; rank 0 writes
    _reshard(model)  # the optimizer holds the sharded parameters
    optimizer_state = full_optimizer_state(model, optimizer)
    plain = model
    if sharded:
        weights = full_model_state(model)
        if main_rank:
            with torch.device("meta"):
                plain = Transformer(model.cfg)
            plain.load_state_dict(weights, assign=True)
            plain.rotary.reset()
    if main_rank:
        state = {"args": run_args, "rng": rng_state(), "ledger": dataclasses.asdict(ledger)}
        save_checkpoint(run_dir, step, plain, optimizer_state, state, tokenizer, keep)
        write_json(run_dir / "cost.json", ledger.summary())
    if dist.is_initialized():
        dist.barrier()


def _reshard(model: Transformer) -> None:
    """Under FSDP2 each block is its own root, and a root keeps its gathered parameters after a forward that no
    backward follows (an evaluation): shard them again."""
    for block in [*model.layers, *model.mtp]:
        if hasattr(block, "reshard"):
            block.reshard()


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
