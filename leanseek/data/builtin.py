"""The built-in corpus: real text that needs no download.

Always there: the running Python's standard library (its docstrings, read with `ast` without importing anything,
and the reference topics pydoc ships). Added when their Debian packages are installed (./run.sh installs them
when it runs as root on Debian or Ubuntu): the Python documentation, the GCIDE dictionary, WordNet's glosses,
the fortune cookies and the Jargon File.
"""

from __future__ import annotations

import ast
import gzip
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .sources import SourceStats, chunk, read_utf8


@dataclass(frozen=True)
class Builtin:
    name: str
    package: str | None  # the Debian package that provides it (None: always there)
    licence: str
    read: Callable[[SourceStats], Iterator[str]]
    path: Path | None = None

    def available(self) -> bool:
        return self.path is None or self.path.exists()


def stdlib_docstrings(stats: SourceStats) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(module, [(qualified name, docstring), ...]) for each standard-library module, read with `ast`: the module's
    docstring and those of its classes and functions, each longer than 40 characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "test" in rel.parts or "tests" in rel.parts:
            continue
        source = read_utf8(file, stats)
        try:
            tree = ast.parse(source or "")
        except SyntaxError:
            stats.skip(f"{file}: not parseable")
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append((module if isinstance(node, ast.Module) else f"{module}.{node.name}", doc))
        if docs:
            yield module, docs


def python_docstrings(stats: SourceStats) -> Iterator[str]:
    """One document per standard-library module: its docstring and those of its classes and functions."""
    for _, docs in stdlib_docstrings(stats):
        yield from chunk("\n\n".join(dict.fromkeys(f"{name}\n\n{doc}" for name, doc in docs)))


def python_topics(stats: SourceStats) -> Iterator[str]:
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        yield from chunk(f"{name}\n\n{text}")


def python_docs(stats: SourceStats) -> Iterator[str]:
    for root in sorted(Path("/usr/share/doc").glob("python3*/html/_sources")):
        for file in sorted(root.rglob("*.rst.txt")):
            text = read_utf8(file, stats)
            if text:
                yield from chunk(text)
        return  # one Python version's documentation is enough


def gcide(stats: SourceStats) -> Iterator[str]:
    text = gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace").read()  # dictzip is gzip-compatible
    entries = [e for e in text.split("\n\n") if e.strip() and not e.startswith("00-database")]
    yield from chunk("\n\n".join(entries))


def wordnet_synsets(parts: tuple[str, ...] = ("noun", "verb", "adj", "adv")) -> Iterator[tuple[str, list[str], str]]:
    """(part of speech, words, gloss) for every synset of WordNet's data files."""
    for pos in parts:
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            fields, gloss = line.split(" | ", 1)
            tokens = fields.split()
            words = [w.replace("_", " ") for w in tokens[4:4 + 2 * int(tokens[3], 16):2]]
            yield pos, words, gloss.strip()


def wordnet(stats: SourceStats) -> Iterator[str]:
    """'word, synonym (noun): gloss' for every synset of WordNet's data files."""
    for part in ("noun", "verb", "adj", "adv"):
        lines = [f"{', '.join(words)} ({pos}): {gloss}" for pos, words, gloss in wordnet_synsets((part,))]
        yield from chunk("\n".join(lines))


def fortunes(stats: SourceStats) -> Iterator[str]:
    for file in sorted(FORTUNES.iterdir()):
        if file.is_file() and not file.suffix:
            text = read_utf8(file, stats)
            if text:
                yield from chunk(text.replace("\n%\n", "\n\n"))


def jargon(stats: SourceStats) -> Iterator[str]:
    yield from chunk(gzip.open(JARGON, "rt", encoding="utf-8", errors="replace").read())


GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")

BUILTINS = {b.name: b for b in [
    Builtin("python-docstrings", None, "PSF-2.0", python_docstrings),
    Builtin("python-topics", None, "PSF-2.0", python_topics),
    Builtin("python-docs", "python3-doc", "PSF-2.0", python_docs, Path("/usr/share/doc/python3-doc")),
    Builtin("gcide", "dict-gcide", "GPL-3.0-or-later", gcide, GCIDE),
    Builtin("wordnet", "wordnet-base", "WordNet 3.0 licence (BSD-style)", wordnet, WORDNET),
    Builtin("fortunes", "fortunes", "BSD-3-Clause (fortune-mod)", fortunes, FORTUNES),
    Builtin("jargon", "jargon-text", "public domain", jargon, JARGON),
]}
DEBIAN_PACKAGES = [b.package for b in BUILTINS.values() if b.package]


def builtin_documents(name: str | None, stats: SourceStats) -> Iterator[str]:
    """All available built-in sources, or the one named."""
    if name is not None and name not in BUILTINS:
        raise ValueError(f"unknown built-in source {name!r}; choose from {', '.join(BUILTINS)}")
    chosen = [BUILTINS[name]] if name else list(BUILTINS.values())
    for source in chosen:
        if source.available():
            yield from source.read(stats)
        elif name:
            raise ValueError(f"built-in source {name!r} needs the Debian package {source.package} "
                             f"(apt-get install {source.package})")
