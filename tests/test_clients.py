"""leanseek serve as real clients drive it (issue 13, part 2): the official openai client for every request shape
(content parts, roles, the fields clients send, log-probabilities, token limits, stop, seed, n), and the bodies
LangChain, LiteLLM and Open WebUI send, recorded from those clients and posted raw, streaming and not.

Log-probabilities are checked against a full forward of the model (log_softmax of its logits over prompt and
output); greedy replies against the engine's own greedy generation; prompt sizes against encode_chat."""

import json

import httpx
import openai
import pytest
import torch
from conftest import LiveServer, randomise, small_config
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import leanseek
from leanseek.data import train_tokenizer
from leanseek.data.chat import encode_chat
from leanseek.data.tokenizer import END_OF_TURN, END_THINK, THINK
from leanseek.serve import create_app

MODEL = "micro"
TEXTS = ["What is the sum of numbers? A harbor is a port. Be brief and think about it."] * 50
CHAT = [{"role": "user", "content": "What is a harbor?"}]
PROMPT = "A harbor is"
MAX_LEN = 320  # room for LangChain's default max_tokens=256 on /v1/completions


def serve(model, tok) -> LiveServer:
    return LiveServer(create_app(leanseek.Engine(model, tok, max_batch=4, max_len=MAX_LEN), tok, MODEL, max_queue=16))


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(iter(TEXTS), 300)
    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size, max_position_embeddings=512)),
                      seed=3)
    return model, tok


@pytest.fixture(scope="module")
def server(setup):
    with serve(*setup) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


class Reference:
    """What the model itself says, outside the server: its greedy tokens (the engine's) and the log-probabilities
    of a full forward."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.engine = leanseek.Engine(model, tok, max_batch=1, max_len=MAX_LEN)
        self.end = tok.token_id(END_OF_TURN)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.engine.generate([prompt], max_new_tokens=n, temperature=0.0, stop=[self.end])[0]

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V]: row i is the distribution of the token after ids[i]."""
        return torch.log_softmax(self.model(torch.tensor([ids])).float()[0], dim=-1)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tok, messages, add_generation_prompt=True)[0]

    def text(self, ids: list[int]) -> str:
        """A completion's text: its tokens decoded, up to the end of the reply."""
        return self.tok.decode(ids).split(END_OF_TURN)[0]


@pytest.fixture(scope="module")
def ref(setup):
    return Reference(*setup)


def same_token(text: str, tok, token: int) -> bool:
    """A token as an API names it: its text, or for a piece of a UTF-8 character OpenAI's "bytes:\\xNN" form
    (whose bytes the callers check by joining them: see token_bytes)."""
    whole = tok.decode([token])
    return text == whole if "\ufffd" not in whole else text.startswith("bytes:")


def token_bytes(text: str) -> bytes:
    """The bytes an API's token name stands for."""
    return bytes.fromhex(text[len("bytes:"):].replace("\\x", "")) if text.startswith("bytes:") else text.encode()


def greedy_chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, **kw)


def reply(r) -> tuple:
    m = r.choices[0].message
    return m.content, (m.model_extra or {}).get("reasoning_content"), r.usage.prompt_tokens, r.usage.completion_tokens


# ------------------------------------------------------------------------------------ messages and roles

def test_text_parts_are_the_joined_string(client, ref):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a harbor?"}]}]
    r = greedy_chat(client, parts)
    assert reply(r) == reply(greedy_chat(client, CHAT))
    assert r.usage.prompt_tokens == len(ref.chat_prompt(CHAT))


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
])
def test_parts_that_are_not_text_are_a_400_naming_the_part(client, part):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, messages)
    assert e.value.param == "messages[1].content[1].type"
    assert "messages[1].content[1].type" in e.value.message and part["type"] in e.value.message


def test_null_or_missing_assistant_content_is_empty(client, ref):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, *CHAT]
    expected = reply(greedy_chat(client, history))
    assert expected[2] == len(ref.chat_prompt(history))
    assert reply(greedy_chat(client, [history[0], {"role": "assistant", "content": None}, *CHAT])) == expected
    assert reply(greedy_chat(client, [history[0], {"role": "assistant"}, *CHAT])) == expected
    with pytest.raises(openai.BadRequestError) as e:  # only an assistant may leave it out
        greedy_chat(client, [{"role": "user", "content": None}])
    assert e.value.param == "messages[0].content"


def test_developer_is_system_and_names_are_accepted(client, ref):
    system = [{"role": "system", "content": "Be brief."}, *CHAT]
    expected = reply(greedy_chat(client, system))
    assert expected[2] == len(ref.chat_prompt(system))
    assert reply(greedy_chat(client, [{"role": "developer", "content": "Be brief."}, *CHAT])) == expected
    named = [{"role": "system", "content": "Be brief.", "name": "ops"},
             {"role": "user", "content": "What is a harbor?", "name": "alice"}]
    assert reply(greedy_chat(client, named)) == expected  # leanseek's template writes no names


def test_fields_with_no_meaning_here_change_nothing(client):
    """user, metadata, store, service_tier, parallel_tool_calls: accepted, and the reply is the plain one."""
    expected = reply(greedy_chat(client, CHAT))
    r = greedy_chat(client, CHAT, user="user-42", metadata={"session": "s1", "app": "test"}, store=False,
                    service_tier="auto", parallel_tool_calls=True)
    assert reply(r) == expected


def test_reasoning_effort(client, ref):
    """low/medium/high leave the model to reason; none/minimal close the think block in the prompt, as the
    terminal chat's /think off does, and the reply is the model's greedy answer after it."""
    expected = reply(greedy_chat(client, CHAT))
    for effort in ("low", "medium", "high"):
        assert reply(greedy_chat(client, CHAT, reasoning_effort=effort)) == expected
    prompt = ref.chat_prompt(CHAT) + ref.tok.encode_markup(THINK + END_THINK)
    answer = ref.text(ref.greedy(prompt, 8))
    for effort in ("none", "minimal"):
        content, reasoning, prompt_tokens, _ = reply(greedy_chat(client, CHAT, reasoning_effort=effort))
        assert prompt_tokens == len(prompt)
        assert not reasoning and content == answer
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, CHAT, reasoning_effort="extreme")
    assert e.value.param == "reasoning_effort"


# ------------------------------------------------------------------------------------ log-probabilities

def test_chat_logprobs_are_the_models(client, ref):
    r = greedy_chat(client, CHAT, logprobs=True, top_logprobs=3)
    prompt = ref.chat_prompt(CHAT)
    out = ref.greedy(prompt, 8)
    full = ref.logprobs(prompt + out)
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(out) == r.usage.completion_tokens
    for k, (e, token) in enumerate(zip(entries, out)):
        row = full[len(prompt) + k - 1]
        assert same_token(e.token, ref.tok, token) and bytes(e.bytes) == token_bytes(e.token)
        assert e.logprob == pytest.approx(row[token].item(), abs=1e-3)
        assert e.logprob == pytest.approx(row.max().item(), abs=1e-3)  # greedy: the most likely token
        best = row.topk(3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        for t, i in zip(e.top_logprobs, best.indices.tolist()):
            assert same_token(t.token, ref.tok, i)
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == ref.tok.decode(out)
    plain = greedy_chat(client, CHAT)
    assert plain.choices[0].logprobs is None and reply(plain) == reply(r)


def test_chat_logprobs_are_before_temperature_and_stream_alike(client, ref):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=1.3, seed=9, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    prompt = ref.chat_prompt(CHAT)
    out = ref.engine.generate([prompt], max_new_tokens=6, temperature=1.3, seed=9, stop=[ref.end])[0]
    full = ref.logprobs(prompt + out)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == len(out)
    for k, (e, token) in enumerate(zip(entries, out)):
        assert same_token(e.token, ref.tok, token)
        assert e.logprob == pytest.approx(full[len(prompt) + k - 1, token].item(), abs=1e-3)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


@pytest.mark.parametrize("bad, param", [(dict(top_logprobs=3), "top_logprobs"),  # needs logprobs=true
                                        (dict(logprobs=True, top_logprobs=21), "top_logprobs")])
def test_chat_logprobs_out_of_range(client, bad, param):
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, CHAT, **bad)
    assert e.value.param == param


def test_completions_echo_and_logprobs_score_the_prompt(client, ref):
    """The legacy shape lm-evaluation-harness reads: with echo the prompt's tokens come first, the first of them
    without a log-probability; top_logprobs maps token text to log-probability."""
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    prompt = ref.tok.encode(PROMPT)
    out = ref.greedy(prompt, 4)
    ids = prompt + out
    full = ref.logprobs(ids)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT + ref.text(out)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert all(same_token(t, ref.tok, i) for t, i in zip(lp.tokens, ids))
    assert b"".join(token_bytes(t) for t in lp.tokens).decode(errors="replace") == ref.tok.decode(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    n = len(prompt) + 1  # the prompt is ASCII: its tokens' offsets are exact; the rest only never go back
    assert lp.text_offset[:n] == [len(ref.tok.decode(ids[:k])) for k in range(n)]
    assert lp.text_offset == sorted(lp.text_offset)
    for k in range(1, len(ids)):
        row = full[k - 1]
        assert lp.token_logprobs[k] == pytest.approx(row[ids[k]].item(), abs=1e-3)
        best = row.topk(2).indices.tolist()
        candidates = {i: row[i].item() for i in best + [ids[k]]}
        assert len(best) <= len(lp.top_logprobs[k]) <= 3  # the two best, and the token itself when not among them
        for text, value in lp.top_logprobs[k].items():
            assert any(same_token(text, ref.tok, i) and value == pytest.approx(v, abs=1e-3)
                       for i, v in candidates.items()), (k, text, value)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    assert plain.choices[0].text == ref.text(out)
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[len(prompt):], abs=1e-5)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].logprobs \
        is None


def test_completions_take_token_ids_and_lists_of_prompts(client, ref):
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of those (what
    lm-evaluation-harness's local-completions sends); one choice per prompt, in order."""
    ids = ref.tok.encode(PROMPT)
    expected = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    assert expected == ref.text(ref.greedy(ids, 5))
    for prompt in ([PROMPT], ids, [ids]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        assert [c.text for c in r.choices] == [expected] and r.usage.prompt_tokens == len(ids)
    other = "What is the sum"
    r = client.completions.create(model=MODEL, prompt=[PROMPT, other], max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [expected, ref.text(ref.greedy(ref.tok.encode(other), 5))]
    for bad in ([ids[0], -1], [ids[0], ref.tok.vocab_size], [], [[]]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=bad, max_tokens=2)
        assert e.value.param is not None and e.value.param.startswith("prompt")


# ------------------------------------------------------------------------------------ limits, stop, seed, n

def test_max_completion_tokens_and_max_tokens(client, ref):
    out = ref.greedy(ref.chat_prompt(CHAT), 3)
    assert len(out) == 3  # the model does not end this reply early
    by_old = greedy_chat(client, CHAT)  # max_tokens=8
    assert by_old.usage.completion_tokens == len(ref.greedy(ref.chat_prompt(CHAT), 8))
    new = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0)
    old = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    both = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, max_tokens=50,
                                          temperature=0)
    for r in (new, old, both):
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert reply(new) == reply(old) == reply(both)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, **{field: 0})
        assert e.value.param == field


def test_stop_up_to_four_strings(client, ref):
    text = ref.text(ref.greedy(ref.tok.encode(PROMPT), 16))
    at = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])  # two whole characters
    stop = [text[at:at + 2], "never-1", "never-2", "never-3"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.index(stop[0])] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stop=stop + ["never-4"])
    assert e.value.param == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, CHAT, stop=["a", "b", "c", "d", "e"])
    assert e.value.param == "stop"


def test_seed_repeats_a_sample(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0)
    first = client.chat.completions.create(**kw, seed=7)
    assert reply(client.chat.completions.create(**kw, seed=7)) == reply(first)
    assert reply(client.chat.completions.create(**kw, seed=8))[0] != reply(first)[0]
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3)
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3)
    assert done.choices[0].text == again.choices[0].text


def test_n_within_the_budget_and_past_it(client, ref):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, n=3, max_tokens=6, temperature=1.0, seed=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # three samples, not one thrice
    again = client.chat.completions.create(model=MODEL, messages=CHAT, n=3, max_tokens=6, temperature=1.0, seed=4)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert r.usage.prompt_tokens == len(ref.chat_prompt(CHAT))  # the prompt counts once, as OpenAI counts it
    assert r.usage.completion_tokens <= 18
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=128, max_tokens=256)
    assert e.value.param == "n"


# ------------------------------------------------------------------------------------ recorded client bodies

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a harbor?"}]

# Each body is what the client put on the wire, captured with a local HTTP server that logged request bodies
# (LangChain and LiteLLM installed apart from this project's environment), or, for Open WebUI, assembled from its
# source as noted. Only the model name is this server's.
RECORDED = [
    # langchain-openai 1.7.4 (langchain-core 1.8.3, openai 3.57.0): ChatOpenAI(...).invoke(messages), defaults
    pytest.param("/v1/chat/completions", {"model": MODEL, "stream": False, "messages": [
        {"content": "You are terse.", "role": "system"}, {"content": "What is a harbor?", "role": "user"}]},
        id="langchain-invoke"),
    # langchain-openai 1.7.4: ChatOpenAI(...).stream(messages) (and streaming=True with invoke: the same body)
    pytest.param("/v1/chat/completions", {"model": MODEL, "stream": True, "messages": [
        {"content": "You are terse.", "role": "system"}, {"content": "What is a harbor?", "role": "user"}]},
        id="langchain-stream"),
    # langchain-openai 1.7.4: ChatOpenAI(temperature=0.2, max_tokens=32, top_p=0.9, seed=3, stop=["\n\n"], n=1);
    # it sends max_tokens as max_completion_tokens
    pytest.param("/v1/chat/completions", {"model": MODEL, "stream": False, "messages": [
        {"content": "You are terse.", "role": "system"}, {"content": "What is a harbor?", "role": "user"}],
        "max_completion_tokens": 32, "n": 1, "seed": 3, "stop": ["\n\n"], "temperature": 0.2, "top_p": 0.9},
        id="langchain-params"),
    # langchain-openai 1.7.4: ChatOpenAI(stream_usage=True, max_completion_tokens=20).stream(messages)
    pytest.param("/v1/chat/completions", {"model": MODEL, "stream": True, "messages": [
        {"content": "You are terse.", "role": "system"}, {"content": "What is a harbor?", "role": "user"}],
        "max_completion_tokens": 20, "stream_options": {"include_usage": True}}, id="langchain-stream-usage"),
    # langchain-openai 1.7.4: a HumanMessage with a list of text blocks, an AIMessage, HumanMessage(name="alice")
    pytest.param("/v1/chat/completions", {"model": MODEL, "stream": False, "messages": [
        {"content": "sys", "role": "system"},
        {"content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": " a harbor."}], "role": "user"},
        {"content": "A port.", "role": "assistant"}, {"content": "More.", "name": "alice", "role": "user"}]},
        id="langchain-parts-history-name"),
    # langchain-openai 1.7.4: ChatOpenAI(reasoning_effort="low")
    pytest.param("/v1/chat/completions", {"model": MODEL, "stream": False, "messages": [
        {"content": "You are terse.", "role": "system"}, {"content": "What is a harbor?", "role": "user"}],
        "reasoning_effort": "low"}, id="langchain-reasoning-effort"),
    # langchain-openai 1.7.4: the completion model, langchain_openai.OpenAI(...).invoke("A harbor is"), defaults:
    # the prompt as a list, null logprobs and seed
    pytest.param("/v1/completions", {"model": MODEL, "prompt": ["A harbor is"], "frequency_penalty": 0,
                                     "logprobs": None, "max_tokens": 256, "n": 1, "presence_penalty": 0,
                                     "seed": None, "temperature": 0.7, "top_p": 1}, id="langchain-llm"),
    # litellm 1.110.2, completion(model="openai/micro", api_base=...): the OpenAI-compatible provider, defaults
    pytest.param("/v1/chat/completions", {"model": MODEL, "messages": SYSTEM_USER}, id="litellm"),
    # litellm 1.110.2: the same with stream=True
    pytest.param("/v1/chat/completions", {"model": MODEL, "messages": SYSTEM_USER, "stream": True},
                 id="litellm-stream"),
    # litellm 1.110.2: max_tokens=32, temperature=0.3, stop=["x"], seed=4, user="u1" (not sent), stream=True,
    # stream_options={"include_usage": True}
    pytest.param("/v1/chat/completions", {"model": MODEL, "messages": SYSTEM_USER, "temperature": 0.3,
                                          "stop": ["x"], "max_tokens": 32, "seed": 4, "stream": True,
                                          "stream_options": {"include_usage": True}}, id="litellm-params"),
    # litellm 1.110.2: model="hosted_vllm/micro" (its own HTTP client, user-agent litellm/1.110.2)
    pytest.param("/v1/chat/completions", {"model": MODEL, "messages": SYSTEM_USER, "max_tokens": 10},
                 id="litellm-hosted-vllm"),
    # litellm 1.110.2: a text part list, an assistant message whose content was None (LiteLLM drops the key)
    pytest.param("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant"},
        {"role": "user", "content": "x"}]}, id="litellm-no-assistant-content"),
    # litellm 1.110.2: text_completion(model="text-completion-openai/micro", prompt="A harbor is", max_tokens=8)
    pytest.param("/v1/completions", {"model": MODEL, "prompt": "A harbor is", "max_tokens": 8},
                 id="litellm-text-completion"),
    # Open WebUI (open-webui/open-webui, 0.5/0.6 series): the chat page's body (src/lib/components/chat/Chat.svelte:
    # stream, stream_options when the model has the "usage" capability, a system prompt from the settings, the
    # chat's params as top-level fields), after the backend took out chat_id, id, session_id, tool_ids, files,
    # features, variables (main.py, utils/middleware.py) and metadata (routers/openai.py) before forwarding
    pytest.param("/v1/chat/completions", {"stream": True, "model": MODEL,
                                          "stream_options": {"include_usage": True}, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is a harbor?"}, {"role": "assistant", "content": "A port."},
        {"role": "user", "content": "And a bay?"}], "seed": 42, "stop": ["</s>"], "temperature": 0.8,
        "top_p": 0.9, "frequency_penalty": 0.0, "max_tokens": 64}, id="open-webui-chat"),
    # Open WebUI 0.5 series: the title task (routers/tasks.py generate_title: stream false, max_completion_tokens
    # renamed max_tokens by routers/openai.py for a server that is not api.openai.com, metadata removed)
    pytest.param("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "Create a concise, 3-5 word title for the chat.\n\n<chat_history>\nUSER: "
                                    "What is a harbor?\nASSISTANT: A port.\n</chat_history>"}],
        "stream": False, "max_tokens": 50}, id="open-webui-title"),
]


def prompt_tokens(tok, path: str, body: dict) -> int:
    """The prompt size a body should report, worked out apart from the server: text parts joined, a missing or
    null content empty, developer as system, names not written (leanseek's template has none)."""
    if path.endswith("/v1/completions"):
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return sum(len(tok.encode(p)) for p in prompts)
    messages = []
    for m in body["messages"]:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        messages.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return len(encode_chat(tok, messages, add_generation_prompt=True)[0])


def events(r: httpx.Response) -> list:
    """A server-sent-events body as its data items, "[DONE]" kept as the string."""
    out = []
    for line in r.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def check_stream(items: list, chat: bool, include_usage: bool) -> tuple[dict[int, str], dict | None]:
    """A well-formed stream: chunks of one id, every choice finished once, [DONE] last, a usage chunk (no
    choices) before it exactly when asked. Returns each choice's text, and the usage."""
    assert items and items[-1] == "[DONE]" and "[DONE]" not in items[:-1]
    chunks = items[:-1]
    assert all("error" not in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for c in chunks:
        if chat:
            ChatCompletionChunk.model_validate(c)
            assert c["object"] == "chat.completion.chunk"
        else:  # the client builds these without validation; their finish_reason is null until the last
            assert c["object"] == "text_completion" and isinstance(c["created"], int) and c["model"] == MODEL
            assert all(isinstance(choice["text"], str) for choice in c["choices"])
        for choice in c["choices"]:
            i = choice["index"]
            assert i not in finished, "a chunk after the choice finished"
            texts[i] = texts.get(i, "") + ((choice["delta"].get("content") or "") if chat else choice["text"])
            if choice.get("finish_reason"):
                assert choice["finish_reason"] in ("stop", "length")
                finished[i] = choice["finish_reason"]
    assert sorted(finished) == sorted(texts) and finished
    with_usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        u = chunks[-1]["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        return texts, u
    assert not with_usage
    return texts, None


@pytest.mark.parametrize("path, body", RECORDED)
def test_recorded_client_bodies(server, setup, path, body):
    """Each body is answered 200 with a well-formed reply, streamed when asked, its prompt the size the
    conversation has and its stop strings honoured; a seeded one streams the same text it returns whole."""
    chat = path.endswith("chat/completions")
    stream = bool(body.get("stream"))
    stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
    size = prompt_tokens(setup[1], path, body)
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        texts, u = check_stream(events(r), chat, bool((body.get("stream_options") or {}).get("include_usage")))
        assert sorted(texts) == list(range(body.get("n", 1)))
        assert not any(s in t for s in stops for t in texts.values())
        if u is not None:
            assert u["prompt_tokens"] == size
        if "seed" not in body and body.get("temperature", 1) != 0:
            return
        whole = httpx.post(server.url + path, json={**body, "stream": False, "stream_options": None}, timeout=60)
        assert whole.status_code == 200, whole.text
        first = whole.json()["choices"][0]
        assert texts[0] == (first["message"]["content"] if chat else first["text"])
        return
    data = r.json()
    prompts = body["prompt"] if not chat and isinstance(body["prompt"], list) else [None]
    if chat:
        ChatCompletion.model_validate(data)
        assert data["object"] == "chat.completion"
        assert all(isinstance(c["message"]["content"], str) for c in data["choices"])
    else:
        Completion.model_validate(data)
        assert data["object"] == "text_completion"
    assert [c["index"] for c in data["choices"]] == list(range(body.get("n", 1) * len(prompts)))
    assert all(c["finish_reason"] in ("stop", "length") for c in data["choices"])
    texts = [c["message"]["content"] if chat else c["text"] for c in data["choices"]]
    assert not any(s in t for s in stops for t in texts)
    u = data["usage"]
    assert u["prompt_tokens"] == size and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit:
        assert u["completion_tokens"] <= limit * len(data["choices"])


def test_open_webui_image_upload_is_a_400_naming_the_part(server):
    """Open WebUI sends an attached image as an image_url part beside the text (Chat.svelte); a text model refuses
    it, naming the part, rather than answering as if the image were not there."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {"stream": True, "model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, image]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages[0].content[1].type" and "image_url" in error["message"]
