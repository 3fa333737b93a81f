"""`leanseek check MODEL`: load a Hugging Face folder with leanseek, time a forward pass on the chosen device and,
when transformers is installed, compare the logits with its implementation's (float32, on the CPU, so that the
comparison is exact to rounding whatever device ran the timing)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..device import add_device_arguments, use_device
from .config import human
from .hf import load_hf

TOLERANCE = 1e-4  # max |logit difference| between two float32 implementations of the same model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a DeepseekV3/V2ForCausalLM folder (config.json + safetensors)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    add_device_arguments(p)


def run(args) -> None:
    device = use_device(args)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_hf(args.model, device=device)
    print(f"loaded {args.model}: {model.cfg.model_type}, {human(model.cfg.param_counts().total)} parameters "
          f"on {device} ({time.perf_counter() - t0:.2f}s)")
    ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq_len))
    with torch.no_grad():
        if device.type == "cuda":  # warm-up: the first CUDA call pays for loading kernels
            model(ids.to(device))
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ours = model(ids.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    print(f"forward {args.batch} x {args.seq_len}: {dt * 1e3:.1f} ms ({ids.numel() / dt:,.0f} tokens/s), "
          f"logits {tuple(ours.shape)}, finite: {bool(ours.isfinite().all())}")
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: skipped the parity check")
        return
    if device.type != "cpu":  # TF32 matmuls are not float32: compare on the CPU
        del model, ours
        model = load_hf(args.model)
        with torch.no_grad():
            ours = model(ids)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    theirs = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        diff = (theirs.eval()(ids).logits - ours.cpu()).abs().max().item()
    verdict = "OK" if diff < TOLERANCE else "MISMATCH"
    print(f"transformers {transformers.__version__} {type(theirs).__name__}: max |logit difference| "
          f"{diff:.2e} ({verdict})")
    if verdict != "OK":
        sys.exit(1)
