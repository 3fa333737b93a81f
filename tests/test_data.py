"""Tokenizer and data pipeline: exact round trips, transformers compatibility, every kind of source, bad input."""

import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from leanseek.cli import main
from leanseek.data import DataError, TextTokenizer, collect, load_split, shards, train_tokenizer, write_shards
from leanseek.data.shards import ShardedTokens, validation_split
from leanseek.data.tokenizer import SPECIAL_TOKENS, THINK
from leanseek.train.loader import WindowSampler, eval_windows

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 4, "Numbers: 12345 + 678 = 13023.",
          "naïve café, Grüße, 日本語のテキスト, emoji 😀🚀", "def f(x):\n    return x ** 2\n"] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(iter(CORPUS), 400)


@pytest.mark.parametrize("text", ["", "plain words", "  leading and trailing  \n", "tabs\tand\r\nCRLF",
                                  "\x00\x01 control \x7f", "😀 🚀 👩‍👩‍👧 日本語 한국어 العربية",
                                  "ééé\u0301 NFC/NFD",
                                  "<think>reasoning</think> answer <|user|>", "1234567890" * 3, "x" * 5000])
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer.encode("In 2026, 1234567 apples")
    digits = [tokenizer.tk.id_to_token(i) for i in ids if tokenizer.tk.id_to_token(i).strip("Ġ").isdigit()]
    assert digits == list("2026") + list("1234567")


def test_special_tokens_and_transformers_loads_it(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.encode_markup(THINK) == [tokenizer.token_id(THINK)]
    assert tokenizer.token_id(THINK) not in tokenizer.encode(THINK)  # text spelling a special token is text
    tokenizer.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    text = "Grüße 12 <think>x</think> 😀"
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode_markup(text)
    assert theirs.encode(text, add_special_tokens=False, split_special_tokens=True) == tokenizer.encode(text)
    assert theirs.decode(tokenizer.encode(text)) == text
    assert theirs.bos_token_id == tokenizer.bos_id and theirs.eos_token_id == tokenizer.eos_id
    assert TextTokenizer.load(tmp_path).encode(text) == tokenizer.encode(text)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(iter(CORPUS), 100)


def test_sources_and_bad_input(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Title\n\nSome markdown text.")
    (folder / "sub" / "b.txt").write_text("Plain text in a subfolder.")
    (folder / "image.png").write_bytes(b"\x89PNG not text")  # not a text suffix: ignored
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: a counted skip
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "first row"}\n\n{"other": 1}\n{"text": "third row"}\n')
    docs, stats = collect([str(folder), str(rows)])
    assert sorted(docs) == ["# Title\n\nSome markdown text.", "Plain text in a subfolder.", "first row", "third row"]
    assert stats[0].skipped == 1 and "latin1.txt: not UTF-8" in stats[0].skipped_examples[0]
    assert stats[1].skipped == 1 and "rows.jsonl:3: no string field 'text'" in stats[1].skipped_examples[0]

    with pytest.raises(DataError, match=r"rows.jsonl' gave no text; skipped 3: .*rows.jsonl:1: no string field 'body'"):
        collect([str(rows)], key="body")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        collect([str(tmp_path / "broken.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty' gave no text"):
        collect([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no such file or folder"):
        collect([str(tmp_path / "missing.txt")])


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["row one", None, "row three"]}), tmp_path / "t.parquet")
    docs, stats = collect([str(tmp_path / "t.parquet")], key="body")
    assert docs == ["row one", "row three"] and stats[0].skipped == 1
    with pytest.raises(DataError, match="no column 'text' \\(columns: body\\)"):
        collect([str(tmp_path / "t.parquet")])


def test_builtin_python_source_is_real_text():
    docs, stats = collect(["builtin:python-topics"])
    assert stats[0].chars > 100_000 and any("assignment" in d for d in docs)


def test_shards_round_trip(tokenizer, tmp_path):
    docs = [f"document {i}: " + "some words " * (i % 7 + 1) for i in range(300)]
    docs, stats = collect([str(_write_jsonl(tmp_path / "d.jsonl", docs))])
    manifest = write_shards(docs, tokenizer, tmp_path / "data", stats, val_fraction=0.1)
    train, info = load_split(tmp_path / "data", "train", verify=True)
    val, val_info = load_split(tmp_path / "data", "val")
    assert isinstance(train, ShardedTokens) and train.dtype == np.uint16
    assert info["documents"] + val_info["documents"] == 300 and 10 < val_info["documents"] < 60
    assert len(train) == info["tokens"] and int((train[:] == tokenizer.bos_id).sum()) == info["documents"]
    # decoding the token stream gives back exactly the documents, in order, each after a BOS
    texts = tokenizer.decode(np.concatenate([train, val]).tolist()).split("<|bos|>")[1:]
    assert sorted(texts) == sorted(docs)
    assert manifest["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in texts[-val_info["documents"]:])
    (tmp_path / "data" / info["files"][0]["file"]).write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="checksum"):
        load_split(tmp_path / "data", "train", verify=True)


def test_validation_split_holds_its_share_of_a_small_corpus():
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), int(n))) for n in rng.integers(10, 8000, 500)]
    chars = sum(map(len, docs))
    hashed = [zlib.crc32(d.encode()) % 100_000 < 1_000 for d in docs]
    held = lambda val: sum(len(d) for d, v in zip(docs, val) if v)  # noqa: E731
    val = validation_split(docs, 0.01)
    # a corpus where the hash alone would hold out nothing, or under half its share: topped up to 1% of the text
    for few in (docs[:60], [d for d, h in zip(docs, hashed) if not h]):
        split = validation_split(few, 0.01)
        assert 0.01 <= held(split) / sum(map(len, few)) < 0.01 + max(map(len, few)) / sum(map(len, few))
    # where the hash holds at least half its share, the split is the hash's alone: a document's own text decides
    assert held(hashed) >= 0.005 * chars and val == hashed
    assert validation_split(docs, 0.0) == [False] * len(docs) and validation_split(docs[::-1], 0.01) == val[::-1]


def test_view_indexes_like_one_array():
    parts = [np.arange(n, dtype=np.uint32) + 1000 * k for k, n in enumerate([5, 1, 0, 7, 3])]
    whole = np.concatenate(parts)
    view = ShardedTokens(parts, np.uint32)
    assert len(view) == len(whole) and view.shape == whole.shape and view.dtype == np.uint32
    for i in range(-len(whole), len(whole)):
        assert view[i] == whole[i]
    rng = np.random.default_rng(0)
    for start, stop in rng.integers(-20, 20, (300, 2)):
        for step in (None, 1, 2, 3, -1, -2):
            key = slice(start, stop, step)
            assert view[key].dtype == np.uint32 and view[key].tolist() == whole[key].tolist(), key
    assert np.array_equal(np.asarray(view), whole) and len(ShardedTokens([], np.uint16)[:]) == 0
    with pytest.raises(IndexError, match="index 16 is out of range for a split of 16 tokens"):
        view[16]
    with pytest.raises(IndexError, match="index -17"):
        view[-17]


def _split_of_several_shards(tokenizer, folder, monkeypatch):
    """A corpus written with shards of ~300 tokens (documents are never cut, so shards differ in size)."""
    monkeypatch.setattr(shards, "SHARD_TOKENS", 300)
    docs = [f"document {i}: " + "some words and more " * (i % 9 + 1) for i in range(400)]
    write_shards(docs, tokenizer, folder, [], val_fraction=0.2)
    view, info = load_split(folder, "train", verify=True)
    whole = np.concatenate([np.fromfile(folder / f["file"], dtype=np.uint16) for f in info["files"]])
    return view, info, whole


def test_windows_across_shards_equal_one_array(tokenizer, tmp_path, monkeypatch):
    view, info, whole = _split_of_several_shards(tokenizer, tmp_path, monkeypatch)
    assert len(info["files"]) >= 5 and len(view.shards) == len(info["files"]) and len(view) == len(whole)
    seq = 48
    boundaries = np.cumsum([f["tokens"] for f in info["files"]])[:-1]
    ours, reference = WindowSampler(view, seq, 8, seed=1), WindowSampler(whole, seq, 8, seed=1)
    straddling = [w for w in range(ours.windows) if any(w * seq < b < w * seq + seq + 1 for b in boundaries)]
    assert len(straddling) >= 4  # windows that start in one shard and end in the next
    for a, b in zip(ours.read(np.arange(ours.windows)), reference.read(np.arange(ours.windows))):
        assert torch.equal(a, b)
    steps = range(ours.windows // 8 + 2)  # a whole epoch and into the next: every window, straddling ones included
    for step in steps:
        for rank in range(2):
            for a, b in zip(ours.micro_batches(step, rank, 2, 2), reference.micro_batches(step, rank, 2, 2)):
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    mask = np.arange(len(whole)) % 3 > 0
    for max_tokens in (seq, 10 * seq, len(whole)):
        for a, b in zip(eval_windows(view, seq, max_tokens, mask), eval_windows(whole, seq, max_tokens, mask)):
            assert torch.equal(a, b)


def test_damaged_shards_are_named(tokenizer, tmp_path, monkeypatch):
    _, info, _ = _split_of_several_shards(tokenizer, tmp_path, monkeypatch)
    third = tmp_path / info["files"][2]["file"]
    data = bytearray(third.read_bytes())
    data[10] ^= 1  # same size, different content: only the checksum sees it
    third.write_bytes(bytes(data))
    load_split(tmp_path, "train")
    with pytest.raises(ValueError, match=f"{third.name}: checksum does not match"):
        load_split(tmp_path, "train", verify=True)
    third.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=f"{third.name}: {len(data) - 2} bytes, but .* lists"):
        load_split(tmp_path, "train")
    third.unlink()
    with pytest.raises(FileNotFoundError, match=f"{third.name}: listed in .*manifest.json but missing"):
        load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="has no split 'test' \\(splits: train, val\\)"):
        load_split(tmp_path, "test")


RSS_PROBE = """
import json, sys
import numpy as np
from leanseek.data import load_split
from leanseek.train.loader import WindowSampler, eval_windows

def memory():
    fields = dict(line.split(":") for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

folder, how = sys.argv[1:]
before = memory()
if how == "lazy":
    tokens, _ = load_split(folder, "train")
else:  # what load_split did before: the shards concatenated into one in-memory array
    manifest = json.load(open(f"{folder}/manifest.json"))
    tokens = np.concatenate([np.memmap(f"{folder}/{f['file']}", dtype=manifest["dtype"], mode="r")
                             for f in manifest["splits"]["train"]["files"]])
sampler = WindowSampler(tokens, 1024, 32, seed=0)
for step in range(4):  # 128 windows at random, and 16 validation windows
    sampler.micro_batches(step, 0, 1, 2)
eval_windows(tokens, 1024, 16 * 1024)
after = memory()
print(json.dumps({k: after[k] - before[k] for k in after}))
"""


def _evict(paths) -> None:
    """Flush files and drop them from the page cache, as most of a corpus larger than RAM is. (Pages still cached
    are mapped into the reader's RSS a whole folio at a time, up to 2 MB per window on recent kernels: page
    cache the kernel can reclaim, not memory the reader holds.)"""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_reading_a_split_keeps_it_out_of_memory(tmp_path, monkeypatch):
    """A 240 MB split: opening it and reading windows across it grows resident memory by a small fraction of its
    size, where concatenating the shards grows it by at least the whole split."""
    monkeypatch.setattr(shards, "SHARD_TOKENS", 40_000_000)
    folder = tmp_path / "big"
    folder.mkdir()
    try:
        writer = shards._SplitWriter(folder, "train", np.dtype(np.uint16))
        pattern = (np.arange(10_000_000) * 7 % 65_521).astype(np.uint16)
        for doc in range(12):  # 10M-token documents, 4 per shard
            writer.add(pattern + np.uint16(doc), "")
        split = writer.finish()
        (folder / "manifest.json").write_text(json.dumps({"dtype": "uint16", "splits": {"train": split}}))
        size = split["tokens"] * 2
        assert len(split["files"]) == 3 and size == 240_000_000
        grown = {}
        for how in ("concatenate", "lazy"):
            if how == "lazy":
                _evict(folder.glob("*.bin"))
            probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder), how], check=True,
                                   capture_output=True, text=True)
            grown[how] = json.loads(probe.stdout)
        report = {how: {k: f"{v / 1e6:.1f} MB" for k, v in g.items()} for how, g in grown.items()}
        print(f"resident memory grown by reading a {size / 1e6:.0f} MB split: {report}")
        assert grown["concatenate"]["RssAnon"] > 0.95 * size, report  # the measurement sees a copy of the split
        assert grown["lazy"]["VmRSS"] < 0.1 * size and grown["lazy"]["RssAnon"] < 0.02 * size, report
    finally:
        shutil.rmtree(folder)  # pytest keeps recent tmp_paths: leave no 240 MB behind


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_data_command(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "d.jsonl", [f"line {i} " + "alpha beta gamma " * 5 for i in range(200)])
    main(["data", "--source", str(src), "builtin:python-topics", "--out", str(tmp_path / "out"),
          "--vocab-size", "600"])
    out = capsys.readouterr().out
    assert "builtin:python-topics" in out and "train:" in out and "val:" in out
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "manifest.json").is_file()
    with pytest.raises(SystemExit):
        main(["data", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert "no such file or folder" in capsys.readouterr().err
