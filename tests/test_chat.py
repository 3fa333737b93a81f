"""The chat format: transformers' apply_chat_template renders and tokenizes exactly what leanseek trains on, and
the SFT loss sees only the assistant's tokens."""

import json

import pytest
from conftest import quiet  # noqa: F401

from leanseek.data import TextTokenizer, train_tokenizer
from leanseek.data.chat import ChatError, encode_chat, read_chats, render

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 47+18+93?"},
        {"role": "assistant", "content": "158", "reasoning_content": "47+18=65 65+93=158"},
        {"role": "user", "content": "And a word for a port?"},
        {"role": "assistant", "content": "harbor"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["What is the sum of numbers? A harbor is a port. Be brief and think."] * 50
    tok = train_tokenizer(iter(texts), 400)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return TextTokenizer.load(folder), folder


def test_transformers_renders_the_same(tokenizer, quiet):  # noqa: F811
    from transformers import AutoTokenizer

    tok, folder = tokenizer
    theirs = AutoTokenizer.from_pretrained(folder)
    for add in (False, True):
        text = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        assert text == render(CHAT, add)
        ids = theirs.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=add)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == encode_chat(tok, CHAT, add)[0]
    assert render(CHAT).startswith("<|bos|><|system|>Be brief.<|end|><|user|>")
    assert "<|assistant|><think>47+18=65 65+93=158</think>158<|end|>" in render(CHAT)
    assert render(CHAT).endswith("<|assistant|><think></think>harbor<|end|>")


def test_loss_mask_covers_assistant_turns_only(tokenizer):
    tok, _ = tokenizer
    ids, mask = encode_chat(tok, CHAT)
    learned = tok.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "<think>47+18=65 65+93=158</think>158<|end|><think></think>harbor<|end|>"


def test_bad_chats_are_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(ChatError, match=r"chats.jsonl:3: message 0: 'role' must be one of"):
        read_chats(path)
    path.write_text("{oops\n")
    with pytest.raises(ChatError, match=r"chats.jsonl:1: not JSON"):
        read_chats(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}]}) + "\n")
    with pytest.raises(ChatError, match="'reasoning_content' must be a string on an assistant message"):
        read_chats(path)
