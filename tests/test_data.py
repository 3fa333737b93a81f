"""Tokenizer and data pipeline: exact round trips, transformers compatibility, every kind of source, bad input."""

import json

import numpy as np
import pytest

from leanseek.cli import main
from leanseek.data import DataError, TextTokenizer, collect, load_split, train_tokenizer, write_shards
from leanseek.data.tokenizer import SPECIAL_TOKENS, THINK

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
    assert tokenizer.encode(THINK) == [tokenizer.token_id(THINK)]
    tokenizer.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    text = "Grüße 12 <think>x</think> 😀"
    assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text)
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
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert info["documents"] + val_info["documents"] == 300 and 10 < val_info["documents"] < 60
    assert len(train) == info["tokens"] and int((train == tokenizer.bos_id).sum()) == info["documents"]
    # decoding the token stream gives back exactly the documents, in order, each after a BOS
    texts = tokenizer.decode(np.concatenate([train, val]).tolist()).split("<|bos|>")[1:]
    assert sorted(texts) == sorted(docs)
    assert manifest["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in texts[-val_info["documents"]:])
    (tmp_path / "data" / info["files"][0]["file"]).write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="checksum"):
        load_split(tmp_path / "data", "train", verify=True)


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
