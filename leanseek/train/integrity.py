"""Checkpoint integrity: `seal` records the size and SHA-256 of every file in a checkpoint folder, `verify` checks
them, so that a truncated, zeroed or missing file is found before anything loads it.

FOLDER/checksums.json  {"algorithm": "sha256", "files": {"model.safetensors": {"bytes": N, "sha256": "..."}, ...}}

Paths are relative to the folder, with subfolders (a distributed checkpoint's shards) included. Files added after
sealing are not checked; a folder without checksums.json (made before checkpoints were sealed) is accepted as is.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import write_text_atomic
from ..data.shards import file_sha256
from ..model.hf import CheckpointError

CHECKSUMS = "checksums.json"

# folder -> the files' (name, bytes, mtime, inode) when it last verified: a process that loads one checkpoint
# several times (resume, then load_hf) hashes it once; any write to a file changes its mtime
_verified: dict[Path, tuple] = {}


def _sha256s(files: list[Path]) -> list[str]:
    # hashlib releases the GIL, so files hash in parallel (SHA-256 runs at ~1.8 GB/s per core with SHA-NI)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, max(1, len(files)))) as pool:
        return list(pool.map(file_sha256, files))


def seal(folder: str | os.PathLike) -> Path:
    """Write FOLDER/checksums.json for every file under `folder` (atomically); returns its path."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _sha256s(paths))}
    path = folder / CHECKSUMS
    write_text_atomic(path, json.dumps({"algorithm": "sha256", "files": files}, indent=2) + "\n")
    return path


def _recorded(folder: Path) -> dict[str, dict] | None:
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if all(isinstance(v["bytes"], int) and isinstance(v["sha256"], str) for v in files.values()):
            return files
    except (ValueError, KeyError, TypeError, AttributeError):  # ValueError: bad JSON or bad UTF-8
        pass
    raise CheckpointError(f"{path} is damaged: it is not the list of checksums that leanseek writes")


def _signature(folder: Path, names: list[str]) -> tuple:
    stats = [(name, (folder / name).stat()) for name in [CHECKSUMS, *names]]
    return tuple((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in stats)


def verify(folder: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first file under `folder` that is missing, has the wrong size or whose
    contents differ from what `seal` recorded. Sizes are checked first (a stat per file), then contents."""
    folder = Path(folder)
    files = _recorded(folder)
    if files is None:
        return
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size < want["bytes"]:
            raise CheckpointError(f"{file} is truncated ({size:,} of {want['bytes']:,} bytes)")
        if size != want["bytes"]:
            raise CheckpointError(f"{file} has {size:,} bytes where {want['bytes']:,} were written")
    key = folder.resolve()
    signature = _signature(folder, list(files))
    if _verified.get(key) == signature:
        return
    for (name, want), digest in zip(files.items(), _sha256s([folder / name for name in files])):
        if digest != want["sha256"]:
            raise CheckpointError(f"{folder / name} is corrupted: same size as written, but its SHA-256 differs "
                                  f"from {CHECKSUMS}'s")
    _verified[key] = signature
