"""`leanseek data`: text sources read, a byte-level BPE trained on a shuffled sample of them (or an existing
tokenizer reused), and everything tokenized into train/val shards with a manifest."""

from __future__ import annotations

import argparse
import random
import time

from ..console import table
from .shards import write_shards
from .sources import collect
from .tokenizer import TextTokenizer, train_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", nargs="+", required=True,
                   help="'builtin', 'builtin:NAME', or paths: text/markdown files or folders, .jsonl, .parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--field", default="text", help="the JSONL field / Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--tokenizer", help="reuse the tokenizer in this folder instead of training one")
    p.add_argument("--tokenizer-sample-mb", type=float, default=20.0,
                   help="train the tokenizer on a shuffled sample of this many million characters")
    p.add_argument("--max-mb-per-source", type=float,
                   help="read only the first this many million characters of each source (a quick trial run)")


def tokenizer_sample(docs: list[str], megabytes: float) -> list[str]:
    """A shuffled sample of about `megabytes` million characters, so that every source is represented."""
    budget, picked = megabytes * 1e6, []
    for doc in random.Random(0).sample(docs, len(docs)):
        picked.append(doc)
        budget -= len(doc)
        if budget <= 0:
            break
    return picked


def run(args) -> None:
    t0 = time.perf_counter()
    limit = args.max_mb_per_source * 1e6 if args.max_mb_per_source is not None else None
    docs, stats = collect(args.source, args.field, limit)
    chars = sum(s.chars for s in stats)
    print(f"read {len(docs):,} documents, {chars / 1e6:.1f}M characters, in {time.perf_counter() - t0:.1f}s")
    if args.tokenizer:
        tokenizer = TextTokenizer.load(args.tokenizer)
    else:
        t0 = time.perf_counter()
        picked = tokenizer_sample(docs, args.tokenizer_sample_mb)
        tokenizer = train_tokenizer(iter(picked), args.vocab_size)
        print(f"trained a {tokenizer.vocab_size:,}-token byte-level BPE on {sum(map(len, picked)) / 1e6:.1f}M "
              f"characters in {time.perf_counter() - t0:.1f}s")
    tokenizer.save(args.out)
    manifest = write_shards(docs, tokenizer, args.out, stats, args.val_fraction)
    rows = [[s["name"], f"{s['documents']:,}", f"{s['chars'] / 1e6:.2f}M", f"{s['skipped']:,}"]
            for s in manifest["sources"]]
    print(table(rows, ["source", "documents", "characters", "skipped"]))
    for s in manifest["sources"]:
        for example in s["skipped_examples"]:
            print(f"  skipped: {example}")
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens "
              f"({split['bytes'] / max(split['tokens'], 1):.2f} bytes/token) in {len(split['files'])} file(s)")
    print(f"wrote {args.out}")
