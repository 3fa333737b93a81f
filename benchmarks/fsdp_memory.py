"""What FSDP saves: the bytes of parameters, gradients and AdamW state that each of 2 FSDP processes holds, against
one unsharded process, both measured from the tensors right after an optimizer step (leanseek pretrain's own
sharding, optimizer and step; gloo on CPU).

    .venv/bin/python benchmarks/fsdp_memory.py [--preset base] [--layers 4] [--threads 1]

Prints each rank's figures, one process's, and the ratio (per rank / unsharded; the target is <= 0.6, the ideal
1/2 plus what stays whole: the routing biases are buffers, not counted, and each rank keeps AdamW's step counts).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import torch
from harness import cpu_model


def measure(args, rank: int, world: int) -> dict:
    """One training step of the preset at float32; this process's bytes of each kind afterwards."""
    import torch.distributed as dist

    from leanseek.model.config import ModelConfig
    from leanseek.model.transformer import Transformer
    from leanseek.train.loop import Objective, Place, build_optimizer, shard, state_bytes, storage_bytes, train_step

    place = Place(rank, world, torch.device("cpu"), world > 1)
    if place.sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, num_hidden_layers=args.layers)
    model = Transformer(cfg).train()
    objective = Objective(model, mtp_weight=0.3, balance_weight=1e-4)
    if place.sharded:
        shard(objective, place)
    optimizer = build_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.1, optimizer_impl="auto"),
                                place.device)
    ids = torch.randint(0, cfg.vocab_size, (2 * world, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = ids[rank * 2:(rank + 1) * 2]
    train_step(objective, objective, optimizer, [(batch[:, :-1], batch[:, 1:])], place, len(model.routers()),
               contextlib.nullcontext)

    params = list(model.parameters())
    out = {"parameters": storage_bytes(params),
           "gradients": storage_bytes(p.grad for p in params if p.grad is not None),
           "optimizer": storage_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
           "total": state_bytes(model, optimizer), "parameter_count": sum(p.numel() for p in params)}
    if place.sharded:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        dist.destroy_process_group()
        return gathered
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the preset's own count is more)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # set for the torchrun processes: where rank 0 writes
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        ranks = measure(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        if int(os.environ["RANK"]) == 0:
            with open(args.worker, "w") as f:
                json.dump(ranks, f)
        return

    with tempfile.TemporaryDirectory() as d:  # the sharded processes first: they and this one never overlap
        out = os.path.join(d, "ranks.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29400 + os.getpid() % 1000), __file__, *sys.argv[1:], "--worker", out],
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, check=True)
        with open(out) as f:
            ranks = json.load(f)
    whole = measure(args, 0, 1)
    print(f"{args.preset} with {args.layers} layers: {whole['parameter_count'] / 1e6:.0f}M parameters (MTP "
          f"included), float32, fused AdamW; torch {torch.__version__}, {args.threads} thread(s) per process, "
          f"{cpu_model()}")
    kinds = ["parameters", "gradients", "optimizer", "total"]
    print(f"{'':<22}" + "".join(f"{k:>14}" for k in kinds) + f"{'ratio':>8}")
    print(f"{'1 process (unsharded)':<22}" + "".join(f"{whole[k] / 2**20:>10.1f} MiB" for k in kinds)
          + f"{1:>8.3f}")
    for r, got in enumerate(ranks):
        print(f"{f'FSDP rank {r} of 2':<22}" + "".join(f"{got[k] / 2**20:>10.1f} MiB" for k in kinds)
              + f"{got['total'] / whole['total']:>8.3f}")
    worst = max(got["total"] for got in ranks) / whole["total"]
    print(f"per rank / unsharded: {worst:.3f} (target <= 0.6)")


if __name__ == "__main__":
    main()
