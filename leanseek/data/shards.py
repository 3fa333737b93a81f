"""Tokenized corpora on disk: flat token files (memory-mapped numpy arrays) per split, and a manifest.

DATA_DIR/
  tokenizer.json, tokenizer_config.json
  train-00000.bin ...   tokens, uint16 (uint32 past 65,536 entries); each document starts with BOS
  val-00000.bin ...
  manifest.json         sources, and per split: documents, tokens, UTF-8 bytes (for bits per byte), files + sha256
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import operator
import os
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import write_text_atomic
from .sources import SourceStats
from .tokenizer import TextTokenizer

FORMAT = 1
SHARD_TOKENS = 100_000_000
BATCH_DOCS = 256


def validation_split(docs: list[str], fraction: float) -> list[bool]:
    """Which documents are held out: those whose text hashes under `fraction`, so a document's split depends only
    on its text (stable under reordering, re-runs and added documents). Where the hash leaves the split under half
    its share of the characters (a small corpus: 516 documents gave one of 45 tokens), documents are added in hash
    order until it holds its share."""
    keys = [zlib.crc32(d.encode("utf-8")) % 100_000 for d in docs]
    val = [k < fraction * 100_000 for k in keys]
    share = fraction * sum(map(len, docs))
    held = sum(len(d) for d, v in zip(docs, val) if v)
    if fraction > 0 and held < share / 2:
        for i in sorted(range(len(docs)), key=keys.__getitem__):
            if held >= share:
                break
            if not val[i]:
                val[i], held = True, held + len(docs[i])
    return val


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 8 MiB blocks into one reused buffer (token shards, checkpoint files)."""
    h = hashlib.sha256()
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


class _SplitWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.files: list[dict] = []
        self.documents = self.tokens = self.bytes = 0
        self._file = None
        self._in_file = 0

    def add(self, ids: list[int], text: str) -> None:
        if self._file is None or self._in_file >= SHARD_TOKENS:
            self._close()
            name = f"{self.split}-{len(self.files):05d}.bin"
            self._tmp = self.folder / f".{name}.tmp{os.getpid()}"
            self._file, self._in_file = self._tmp.open("wb"), 0
            self.files.append({"file": name})
        np.asarray(ids, dtype=self.dtype).tofile(self._file)
        self._in_file += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        self.bytes += len(text.encode("utf-8"))

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            entry = self.files[-1]
            os.replace(self._tmp, self.folder / entry["file"])
            entry.update(tokens=self._in_file, sha256=file_sha256(self.folder / entry["file"]))
            self._file = None

    def finish(self) -> dict:
        self._close()
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "files": self.files}


def write_shards(docs: list[str], tokenizer: TextTokenizer, out: str | os.PathLike, sources: list[SourceStats],
                 val_fraction: float = 0.01) -> dict:
    """Tokenize `docs` (BOS before each) into train and validation token files under `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    val = validation_split(docs, val_fraction)
    if all(val):
        raise ValueError(f"every one of the {len(docs)} documents fell in the validation split; "
                         "give more text or a smaller --val-fraction")
    writers = {"train": _SplitWriter(out, "train", dtype), "val": _SplitWriter(out, "val", dtype)}
    with tqdm(total=len(docs), desc="tokenizing", unit="doc", disable=None) as bar:
        for start in range(0, len(docs), BATCH_DOCS):
            batch = docs[start:start + BATCH_DOCS]
            for doc, ids, is_val in zip(batch, tokenizer.encode_batch(batch), val[start:start + BATCH_DOCS]):
                writers["val" if is_val else "train"].add([tokenizer.bos_id, *ids], doc)
            bar.update(len(batch))
    manifest = {
        "format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
        "val_fraction": val_fraction,
        "sources": [{"name": s.name, "documents": s.documents, "chars": s.chars, "skipped": s.skipped,
                     "skipped_examples": s.skipped_examples} for s in sources],
        "splits": {name: w.finish() for name, w in writers.items()},
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


class ShardedTokens:
    """The tokens of one split as a single read-only sequence over its memory-mapped shard files.

    Nothing is concatenated: indexing finds the shard(s) holding the requested range and reads only that, so a
    corpus larger than RAM trains from the page cache. Supports len(), `dtype`, `shape`, integer indexing (a numpy
    scalar) and slicing (a numpy array: a view of the memmap when the range lies in one shard, a copy of just that
    range when it crosses shard boundaries). `np.asarray(view)` reads the whole split into memory: for small splits.
    """

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype | str):
        self.shards = shards
        self.dtype = np.dtype(dtype)
        # shard k holds the tokens [starts[k], starts[k + 1]) of the split
        self._starts = list(itertools.accumulate((len(s) for s in shards), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens, {self.dtype.name}, {len(self.shards)} shards)"

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self._gather(np.arange(start, stop, step))
            return self._range(start, max(start, stop))
        i = operator.index(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for a split of {len(self)} tokens")
        i %= len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        return self.shards[k][i - self._starts[k]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.array(self[:], dtype=dtype, copy=copy)

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        k = bisect.bisect_right(self._starts, start) - 1  # the last shard starting at or before `start`
        while start < stop:
            end = min(stop, self._starts[k + 1])
            pieces.append(self.shards[k][start - self._starts[k]:end - self._starts[k]])
            start, k = end, k + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty(len(indices), self.dtype)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        for k in np.unique(shard):
            here = shard == k
            out[here] = self.shards[k][indices[here] - self._starts[k]]
        return out


def load_split(data_dir: str | os.PathLike, split: str, verify: bool = False) -> tuple[ShardedTokens, dict]:
    """The tokens of one split as a lazy view over its memory-mapped shards (nothing is read into RAM until a
    window is), and its manifest entry. verify: check each file's sha256 first."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: make the data with `leanseek data --out {data_dir}`")
    manifest = json.loads(manifest_path.read_text())
    if split not in manifest["splits"]:
        raise ValueError(f"{manifest_path} has no split {split!r} (splits: {', '.join(manifest['splits'])})")
    info = manifest["splits"][split]
    shards = []
    for entry in info["files"]:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {manifest_path} but missing; remake the data with "
                                    "`leanseek data`")
        if verify and file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: checksum does not match {manifest_path}")
        size, expected = path.stat().st_size, entry["tokens"] * np.dtype(manifest["dtype"]).itemsize
        if size != expected:  # a cheap check without verify: a truncated shard would silently shorten the split
            raise ValueError(f"{path}: {size} bytes, but {manifest_path} lists {entry['tokens']} tokens "
                             f"({expected} bytes); remake the data with `leanseek data`")
        shards.append(np.memmap(path, dtype=manifest["dtype"], mode="r"))
    return ShardedTokens(shards, manifest["dtype"]), info
