"""Tokenized corpora on disk: flat token files (memory-mapped numpy arrays) per split, and a manifest.

DATA_DIR/
  tokenizer.json, tokenizer_config.json
  train-00000.bin ...   tokens, uint16 (uint32 past 65,536 entries); each document starts with BOS
  val-00000.bin ...
  manifest.json         sources, and per split: documents, tokens, UTF-8 bytes (for bits per byte), files + sha256
"""

from __future__ import annotations

import hashlib
import json
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


def is_validation(doc: str, fraction: float) -> bool:
    """A document's split depends only on its text (stable under reordering and re-runs)."""
    return zlib.crc32(doc.encode("utf-8")) % 100_000 < fraction * 100_000


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
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
            entry.update(tokens=self._in_file, sha256=_sha256(self.folder / entry["file"]))
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
    val = [is_validation(d, val_fraction) for d in docs]
    if val_fraction > 0 and not any(val):
        val[len(val) // 2] = True  # a tiny corpus still gets a validation document
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


def load_split(data_dir: str | os.PathLike, split: str, verify: bool = False) -> tuple[np.ndarray, dict]:
    """The tokens of one split as one memory-mapped array (concatenated shards are read lazily), and its
    manifest entry. verify: check each file's sha256 first."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: make the data with `leanseek data --out {data_dir}`")
    manifest = json.loads(manifest_path.read_text())
    info = manifest["splits"][split]
    arrays = []
    for entry in info["files"]:
        path = data_dir / entry["file"]
        if verify and _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: checksum does not match {manifest_path}")
        arrays.append(np.memmap(path, dtype=manifest["dtype"], mode="r"))
    tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return tokens, info
