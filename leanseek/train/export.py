"""`leanseek export RUN_OR_CHECKPOINT --out DIR`: a training checkpoint as a Hugging Face folder (config.json,
safetensors, tokenizer, generation_config.json) that transformers, vLLM and SGLang load; `--gguf FILE`: as one GGUF
file that llama.cpp loads (see gguf.py).

A whole-model checkpoint already is one (less its optimizer state); a sharded run's checkpoint (model-shards/) is
not, and this is the one step that gathers its weights, in a single process, after training.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from ..data import TextTokenizer
from ..model.hf import load_hf, load_hf_streamed, save_hf
from .checkpoint import checkpoint_of, save_tokenizer
from .gguf import OUTTYPES, write_gguf
from .integrity import seal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (its newest checkpoint is exported) or a checkpoint folder, sharded or not")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="the Hugging Face folder to write (absent or empty)")
    where.add_argument("--gguf", metavar="FILE", help="write a GGUF file for llama.cpp instead (needs the gguf "
                                                      "package: pip install 'leanseek[gguf]')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="--out: the weights' dtype (the routing bias stays float32); default: float32, as trained")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES,
                   help="--gguf: the matrices' type (norms and the router stay f32); default: f32")


def run(args) -> Path:
    source = checkpoint_of(Path(args.model))
    if args.gguf:
        return export_gguf(source, Path(args.gguf), args.outtype)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; name a new one")
    model = load_hf(source)
    # built beside the destination and renamed into place: an interrupted export leaves no half-written folder
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf(model, tmp, dtype=getattr(torch, args.dtype))
        if (source / "tokenizer.json").is_file():
            save_tokenizer(tmp, TextTokenizer.load(source))
        seal(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {source} to {out} ({args.dtype}): a Hugging Face model folder")
    return out


def export_gguf(source: Path, out: Path, outtype: str) -> Path:
    if out.is_dir():
        raise ValueError(f"--gguf {out}: is a folder; name the file to write")
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"{source} has no tokenizer.json: a GGUF file carries its tokenizer")
    run = source.parent.parent if source.parent.name == "checkpoints" else source
    # not strict: a foreign tokenizer is refused by write_gguf, with what to use instead
    model, layers = load_hf_streamed(source)  # a layer at a time: checkpoints larger than memory export too
    written = write_gguf(model, TextTokenizer.load(source, strict=False), out, outtype, name=run.name, layers=layers)
    types = ", ".join(f"{n} {kind}" for kind, n in sorted(written["types"].items()))
    print(f"exported {source} to {out} ({outtype}; {written['tensors']} tensors: {types}; "
          f"{written['bytes'] / 2**20:.1f} MiB): a GGUF file for llama.cpp")
    return out
