"""Text sources for `leanseek data`: files and folders of text or markdown, JSONL (a named field), Parquet, and
`builtin` (see builtin.py). Each yields documents (strings); what cannot be read is counted and named, never
silently dropped, and a source that yields nothing is an error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
MAX_DOC_CHARS = 32_000  # longer texts are split at paragraph boundaries, so that splits and batches mix well


class DataError(ValueError):
    """A source cannot give text; the message names the source, file, line or field."""


@dataclass
class SourceStats:
    name: str
    documents: int = 0
    chars: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, what: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(what)


def chunk(text: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Split text into pieces of at most `limit` characters, at blank lines where possible, else at line ends."""
    start, end = 0, len(text)
    while start < end:
        cut = end
        if end - start > limit:
            floor = start + limit // 4  # a cut earlier than this would leave a tiny piece
            cut = text.rfind("\n\n", start, start + limit)
            if cut <= floor:
                cut = text.rfind("\n", start, start + limit)
            if cut <= floor:
                cut = start + limit
        piece = text[start:cut].strip()
        if piece:
            yield piece
        start = cut


def read_utf8(path: Path, stats: SourceStats) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        stats.skip(f"{path}: not UTF-8 (byte {e.start})")
    except OSError as e:
        stats.skip(f"{path}: unreadable ({e.strerror})")
    return None


def text_files(path: Path, stats: SourceStats) -> Iterator[str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir() and file.suffix.lower() not in TEXT_SUFFIXES:
            continue  # folders: text and markdown files only
        text = read_utf8(file, stats)
        if text is not None:
            yield from chunk(text)


def jsonl(path: Path, key: str, stats: SourceStats) -> Iterator[str]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skip(f"{path}:{number}: not UTF-8")
                continue
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                stats.skip(f"{path}:{number}: no string field {key!r}")
                continue
            yield from chunk(value)


def parquet(path: Path, key: str, stats: SourceStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'leanseek[parquet]'") from None
    table = pq.ParquetFile(path)
    if key not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {key!r} (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[key]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield from chunk(value)
            else:
                stats.skip(f"{path}: a row whose {key!r} is {type(value).__name__}")


def documents(spec: str, key: str, stats: SourceStats) -> Iterator[str]:
    """Documents of one source: 'builtin', 'builtin:NAME', a file, or a folder."""
    if spec == "builtin" or spec.startswith("builtin:"):
        from .builtin import builtin_documents

        yield from builtin_documents(spec.partition(":")[2] or None, stats)
        return
    path = Path(spec)
    if not path.exists():
        raise DataError(f"source {spec!r}: no such file or folder (or say 'builtin')")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".json"):
        yield from jsonl(path, key, stats)
    elif path.is_file() and suffix == ".parquet":
        yield from parquet(path, key, stats)
    else:
        yield from text_files(path, stats)


def collect(specs: list[str], key: str = "text", max_chars: float | None = None) -> tuple[list[str], list[SourceStats]]:
    """All documents of all sources (or each source's first documents up to about `max_chars` characters), and
    per-source counts. Raises DataError for a source that yields nothing."""
    from .builtin import BUILTINS

    docs, all_stats = [], []
    # 'builtin' stands for each available built-in source, so that each is counted on its own
    available = [f"builtin:{name}" for name, b in BUILTINS.items() if b.available()]
    specs = [each for spec in specs for each in (available if spec == "builtin" else [spec])]
    for spec in specs:
        stats = SourceStats(spec)
        for doc in documents(spec, key, stats):
            if doc.strip():
                docs.append(doc)
                stats.documents += 1
                stats.chars += len(doc)
                if max_chars is not None and stats.chars >= max_chars:
                    break
        if not stats.documents:
            why = f"; skipped {stats.skipped}: {'; '.join(stats.skipped_examples)}" if stats.skipped else ""
            raise DataError(f"source {spec!r} gave no text{why}")
        all_stats.append(stats)
    return docs, all_stats
