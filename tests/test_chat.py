"""The chat format: transformers' apply_chat_template renders and tokenizes exactly what leanseek trains on, the
SFT loss sees only the assistant's tokens, and validate() normalises what OpenAI clients send or names the field
it refuses."""

import json

import pytest
from conftest import quiet  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanseek.data import TextTokenizer, train_tokenizer
from leanseek.data.chat import ChatError, encode_chat, read_chats, render, validate
from leanseek.data.tokenizer import SPECIAL_TOKENS

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 47+18+93?"},
        {"role": "assistant", "content": "158", "reasoning_content": "47+18=65 65+93=158"},
        {"role": "user", "content": "And a word for a port?"},
        {"role": "assistant", "content": "harbor", "reasoning_content": "a port: harbor"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["What is the sum of numbers? A harbor is a port. Be brief and think."] * 50
    tok = train_tokenizer(iter(texts), 400)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return TextTokenizer.load(folder), folder


@pytest.fixture(scope="module")
def theirs(tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer[1])


def their_ids(theirs, chat, add):
    ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=add)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_transformers_renders_the_same(tokenizer, theirs, quiet):  # noqa: F811
    tok, _ = tokenizer
    for add in (False, True):
        assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add) == render(CHAT, add)
        assert their_ids(theirs, CHAT, add) == encode_chat(tok, CHAT, add)[0]
    assert render(CHAT).startswith("<|bos|><|system|>Be brief.<|end|><|user|>")
    # the reasoning of a turn before the last user message is dropped, as in DeepSeek's API
    assert "<|assistant|><think></think>158<|end|>" in render(CHAT)
    assert render(CHAT).endswith("<|assistant|><think>a port: harbor</think>harbor<|end|>")


# text near the special spellings ("<|", "think>", "|>") without spelling one: it must still tokenize as before
PLAIN = st.lists(st.sampled_from(list("ab <|>/\n\t7é😀") + ["think", "end", "user", "<|en", "<think", "|>"]),
                 max_size=12).map("".join).filter(lambda s: not any(t in s for t in SPECIAL_TOKENS))


@st.composite
def conversations(draw, text=PLAIN):
    chat = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        chat.append({"role": "user", "content": draw(text)})
        reply = {"role": "assistant", "content": draw(text)}
        if draw(st.booleans()):
            reply["reasoning_content"] = draw(text)
        chat.append(reply)
    return chat[:-1] if draw(st.booleans()) else chat


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=conversations(), add=st.booleans())
def test_ids_are_transformers_for_text_without_special_spellings(tokenizer, theirs, chat, add):
    tok, _ = tokenizer
    assert encode_chat(tok, chat, add)[0] == their_ids(theirs, chat, add)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=PLAIN)
def test_text_encoding_is_unchanged_without_special_spellings(tokenizer, theirs, text):
    tok, _ = tokenizer
    assert tok.encode(text) == tok.encode_markup(text) == theirs.encode(text, add_special_tokens=False)
    assert tok.encode_batch([text, "x" + text]) == [tok.encode(text), tok.encode("x" + text)]


def test_loss_mask_covers_assistant_turns_only(tokenizer):
    tok, _ = tokenizer
    ids, mask = encode_chat(tok, CHAT)
    learned = tok.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "<think></think>158<|end|><think>a port: harbor</think>harbor<|end|>"


def test_validate_normalises_what_clients_send():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "What is "},
                                                            {"type": "text", "text": "a harbor?"}]},
                {"role": "assistant", "content": None, "reasoning_content": "A port."},
                {"role": "assistant", "tool_calls": [], "refusal": None},
                {"role": "user", "content": [], "reasoning_content": None}]
    assert validate(messages) == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is a harbor?", "name": "ann"},
                                  {"role": "assistant", "content": "", "reasoning_content": "A port."},
                                  {"role": "assistant", "content": ""},
                                  {"role": "user", "content": ""}]
    assert messages[0]["role"] == "developer"  # the caller's dicts are left alone


@pytest.mark.parametrize("messages, param, problem", [
    (None, "messages", "must be a non-empty list"),
    ([], "messages", "must be a non-empty list"),
    (["hi"], "messages[0]", "must be an object"),
    ([{"role": "bot", "content": "x"}], "messages[0].role", "must be one of system, developer, user, assistant, tool"),
    ([{"content": "x"}], "messages[0].role", "must be one of"),
    ([{"role": ["user"], "content": "x"}], "messages[0].role", "must be one of"),
    ([{"role": "assistant", "content": None, "function_call": {"name": "f"}}],
     "messages[0].function_call", "is not supported: send tool_calls"),
    ([{"role": "user", "content": None}], "messages[0].content", "must be a string or a list of text parts"),
    ([{"role": "system"}], "messages[0].content", "must be a string or a list of text parts"),
    ([{"role": "user", "content": 7}], "messages[0].content", "must be a string or a list of text parts"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}],
     "messages[1].content[1].type", "only text parts are supported, not 'image_url'"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[0].type", "not 'input_audio'"),
    ([{"role": "user", "content": [{"type": "file", "file": {}}]}], "messages[0].content[0].type", "not 'file'"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", "must be an object with 'type'"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "messages[0].content[0].text",
     "must be a string"),
    ([{"role": "user", "content": "q", "name": 3}], "messages[0].name", "must be a string"),
    ([{"role": "user", "content": "q", "reasoning_content": "r"}], "messages[0].reasoning_content",
     "must be a string on an assistant message"),
    ([{"role": "assistant", "content": "a", "reasoning_content": ["r"]}], "messages[0].reasoning_content",
     "must be a string on an assistant message"),
])
def test_validate_refuses_naming_the_field(messages, param, problem):
    with pytest.raises(ChatError) as e:
        validate(messages)
    assert e.value.param == param
    assert str(e.value).startswith(f"conversation: {param}: ") and problem in str(e.value)
    with pytest.raises(ChatError) as e:
        validate(messages, where="")
    assert str(e.value).startswith(f"{param}: ")


def test_bad_chats_are_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(ChatError, match=r"chats.jsonl:3: messages\[0\].role: must be one of") as e:
        read_chats(path)
    assert e.value.param == "messages[0].role"
    path.write_text("{oops\n")
    with pytest.raises(ChatError, match=r"chats.jsonl:1: not JSON"):
        read_chats(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}]}) + "\n")
    with pytest.raises(ChatError, match=r"messages\[0\].reasoning_content: must be a string on an assistant"):
        read_chats(path)


def test_read_chats_normalises(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    assert read_chats(path) == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]]
