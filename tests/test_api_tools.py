"""Tools and structured outputs through the API, with the official openai client: tool calls read out of a scripted
reply (leanseek's format and a DeepSeek-V3.1-style folder's), streamed as fragments the client's own accumulator
joins into the same calls; `required`, a named function, strict tools and response_format enforced by constrained
decoding in the engine (the output validates against pydantic models of the schemas), and which replies each
request's grammar lets through; tool history and tools reaching the prompt as transformers renders them; every bad
tool field a 400 naming it."""

import copy
import json
import re
from typing import Literal

import httpx
import openai
import pydantic
import pytest
import torch
from conftest import ScriptedEngine, quiet, served_model, small_config  # noqa: F401
from openai.lib.streaming.chat import ChatCompletionStreamState
from test_server import CHAT, TEXTS, Server

import leanseek
from leanseek.data import TextTokenizer
from leanseek.data.tokenizer import BASE_TOKENS

DEFINE = {"type": "function", "function": {
    "name": "define", "description": "The dictionary definition of a word.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}
# bounded values only: a random model fills whatever a schema leaves open (a string, an integer) without end
LOOKUP = {"type": "object", "properties": {"word": {"enum": ["harbor", "port", "sum"]}, "loud": {"type": "boolean"}},
          "required": ["word", "loud"], "additionalProperties": False}
ADD = {"type": "function", "function": {"name": "add", "strict": True, "parameters": {
    "type": "object", "properties": {"a": {"enum": [1, 2, 3]}, "b": {"enum": [4, 5]}}, "required": ["a", "b"],
    "additionalProperties": False}}}
LOOK = {"type": "function", "function": {"name": "look_up", "strict": True, "parameters": LOOKUP}}


class Lookup(pydantic.BaseModel):  # LOOKUP as pydantic checks it, apart from the grammar's reading of the schema
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    word: Literal["harbor", "port", "sum"]
    loud: bool


class Add(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    a: Literal[1, 2, 3]
    b: Literal[4, 5]


MODELS = {"look_up": Lookup, "add": Add}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


@pytest.fixture(scope="module")
def setup():
    return served_model(TEXTS, 1024)


@pytest.fixture(scope="module")
def live(setup):
    """The random model, constrained."""
    model, tok = setup
    with Server(model, tok, engine=leanseek.Engine(model, tok, max_batch=4, max_len=1024), max_queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def flat(setup):
    """The random model with every logit 0 (its last norm zeroed): greedy decoding takes the lowest token id the
    constraint allows, so the reply goes where the grammar lets it through the engine's masks (the random model,
    free to write text before a call, writes text to the end of its budget)."""
    model, tok = setup
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.norm.weight.zero_()
    with Server(model, tok, engine=leanseek.Engine(model, tok, max_batch=4, max_len=1024), max_queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def plain(setup):
    """A scripted server that answers "ok"."""
    with scripted(setup[1], "<think></think>ok<|end|>") as s:
        yield s


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def scripted(tok, reply: str, **kw) -> Server:
    """A server whose engine answers every request with `reply` (markup spellings as their tokens)."""
    return Server(None, tok, engine=ScriptedEngine([tok.encode_markup(reply)], delay=0), **kw)


def accumulated(stream) -> tuple:
    """The completion the openai client's own accumulator (what `.stream()` uses) makes of the streamed chunks,
    and the chunks."""
    state = ChatCompletionStreamState()
    chunks = list(stream)
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state.get_final_completion(), chunks


def calls_of(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


# ------------------------------------------------------------------------------------------------ parsing replies

TWO_CALLS = ('<think>Look both up.</think>Let me check.<|tool_call|>define<|tool_args|>{"word": "harbor"}'
             '<|tool_call|>define<|tool_args|>{"word": "port"}<|end|>')


def test_a_reply_with_calls_is_tool_calls_streamed_and_not(setup):
    _, tok = setup
    with scripted(tok, TWO_CALLS) as s:
        client = client_of(s)
        r = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE])
        final, chunks = accumulated(client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE],
                                                                   stream=True))
        several = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE], n=2)
    expected = [("define", '{"word": "harbor"}'), ("define", '{"word": "port"}')]
    for choice in (r.choices[0], final.choices[0], *several.choices):
        message = choice.message
        assert calls_of(message) == expected
        assert message.content == "Let me check." and message.model_extra["reasoning_content"] == "Look both up."
        assert all(CALL_ID.fullmatch(c.id) and c.type == "function" for c in message.tool_calls)
        assert choice.finish_reason == "tool_calls"
    ids = [c.id for choice in (r.choices[0], final.choices[0], *several.choices) for c in choice.message.tool_calls]
    assert len(set(ids)) == len(ids) == 8  # every call its own id
    fragments = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [f.index for f in fragments if f.id] == [0, 1]  # each call opens with its id, type and name
    assert all(f.type == "function" and f.function.name == "define" for f in fragments if f.id)
    assert all(f.id is None and f.function.name is None for f in fragments if not f.id)
    for i, (_, arguments) in enumerate(expected):
        assert "".join(f.function.arguments or "" for f in fragments if f.index == i) == arguments


def test_a_call_alone_has_null_content_and_malformed_ones_are_text(setup):
    _, tok = setup
    alone = '<think></think><|tool_call|>define<|tool_args|>{"word": "harbor"}<|end|>'
    with scripted(tok, alone) as s:
        message = client_of(s).chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE]).choices[0].message
    assert message.content is None and calls_of(message) == [("define", '{"word": "harbor"}')]
    broken = '<think></think>Well.<|tool_call|>define<|tool_args|>{"word": "harb<|end|>'
    with scripted(tok, broken) as s:
        client = client_of(s)
        r = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE])
        final, _ = accumulated(client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE],
                                                              stream=True))
    for choice in (r.choices[0], final.choices[0]):
        assert choice.message.tool_calls is None and choice.finish_reason == "stop"
        assert choice.message.content == 'Well.<|tool_call|>define<|tool_args|>{"word": "harb'
    # text that could have begun a call is held back while it might, and given out at the end
    with scripted(tok, "<think></think>Type <|tool<|end|>") as s:
        client = client_of(s)
        r = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE])
        final, _ = accumulated(client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE],
                                                              stream=True))
    assert r.choices[0].message.content == final.choices[0].message.content == "Type <|tool"


def test_tool_choice_none_sees_the_tools_and_drops_calls_and_parallel_false_keeps_one(setup):
    _, tok = setup
    with scripted(tok, TWO_CALLS) as s:
        client = client_of(s)
        auto = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE])
        none = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE], tool_choice="none")
        plain = client.chat.completions.create(model="micro", messages=CHAT)
        one = client.chat.completions.create(model="micro", messages=CHAT, tools=[DEFINE], parallel_tool_calls=False)
        one_streamed, _ = accumulated(client.chat.completions.create(
            model="micro", messages=CHAT, tools=[DEFINE], parallel_tool_calls=False, stream=True))
        prompts = s.engine.prompts
    assert prompts[0] == prompts[1] != prompts[2]  # "none" shows the tools as "auto" does
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert none.choices[0].message.content == "Let me check."
    assert plain.choices[0].message.tool_calls is None  # no tools: the reply is text as the model wrote it
    assert "<|tool_call|>define" in plain.choices[0].message.content
    for r in (one, one_streamed):
        assert calls_of(r.choices[0].message) == [("define", '{"word": "harbor"}')]
    assert len(auto.choices[0].message.tool_calls) == 2


# ------------------------------------------------------------------------------------------------ the prompt

def test_tools_and_tool_history_reach_the_prompt_as_transformers_renders_them(setup, tmp_path, quiet):  # noqa: F811
    from transformers import AutoTokenizer

    _, tok = setup
    tok.save(tmp_path)
    history = [{"role": "system", "content": "Be brief."}, *CHAT,
               {"role": "assistant", "content": None, "reasoning_content": "I should look.",
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "define", "arguments": '{"word": "harbor"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "a sheltered port"}]
    with scripted(tok, "<think></think>A port.<|end|>") as s:
        r = client_of(s).chat.completions.create(model="micro", messages=history, tools=[DEFINE])
        prompt = s.engine.prompts[0]
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(history, tools=[DEFINE],
                                                                        add_generation_prompt=True)
    assert prompt == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert r.choices[0].message.content == "A port." and r.choices[0].finish_reason == "stop"


def test_a_reply_with_calls_goes_back_into_the_history_as_the_client_sends_it(setup, tmp_path, quiet):  # noqa: F811
    """The client appends the reply's message object and a tool result per call: the next prompt is the
    conversation with those calls and results, the reasoning of the turn in progress kept (transformers renders
    the same)."""
    from transformers import AutoTokenizer

    _, tok = setup
    tok.save(tmp_path)
    with scripted(tok, TWO_CALLS) as s:
        client = client_of(s)
        messages = [*CHAT]
        message = client.chat.completions.create(model="micro", messages=messages, tools=[DEFINE]).choices[0].message
        messages.append(message)
        messages += [{"role": "tool", "tool_call_id": c.id, "content": f"meaning {i}"}
                     for i, c in enumerate(message.tool_calls)]
        client.chat.completions.create(model="micro", messages=messages, tools=[DEFINE])
        prompt = s.engine.prompts[1]
    sent = [*CHAT, message.model_dump(exclude_none=True), *messages[2:]]
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(sent, tools=[DEFINE],
                                                                        add_generation_prompt=True)
    assert prompt == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert "Look both up." in tok.decode(prompt) and tok.decode(prompt).count("<|tool|>") == 2


# ------------------------------------------------------------------------------------------------ constrained

def test_required_and_named_calls_validate(flat):
    """"required" gives at least one call of a given tool whose strict arguments validate; a named function gives
    calls of that one only; streamed, the same calls."""
    client = client_of(flat)
    kw = dict(model="micro", messages=CHAT, max_tokens=120, temperature=0, reasoning_effort="none")
    tools = [ADD, LOOK]
    required = client.chat.completions.create(**kw, tools=tools, tool_choice="required")
    streamed, _ = accumulated(client.chat.completions.create(**kw, tools=tools, tool_choice="required", stream=True))
    named = client.chat.completions.create(**kw, tools=tools, tool_choice={"type": "function",
                                                                           "function": {"name": "look_up"}})
    for r in (required, streamed, named):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for name, arguments in calls_of(choice.message):
            MODELS[name].model_validate_json(arguments)
    assert calls_of(streamed.choices[0].message) == calls_of(required.choices[0].message)
    assert {name for name, _ in calls_of(named.choices[0].message)} == {"look_up"}
    single = client.chat.completions.create(**kw, tools=tools, tool_choice="required", parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1



def test_response_format_json_schema_and_json_object(live):
    """The client's own structured-output path (.parse with a pydantic model: a strict json_schema) gets content
    that parses into the model; json_object gives a JSON object; streamed and not alike."""
    client = client_of(live)
    kw = dict(model="micro", messages=CHAT, max_tokens=150, temperature=0, reasoning_effort="none")
    fmt = {"type": "json_schema", "json_schema": {"name": "lookup", "schema": LOOKUP, "strict": True}}
    worker = live.app.state.worker
    submit, constraints = worker.submit, []

    def spy(prompt, params):
        constraints.append(params.get("constraint"))
        return submit(prompt, params)

    worker.submit = spy
    try:
        r = client.chat.completions.create(**kw, response_format=fmt)
        streamed, _ = accumulated(client.chat.completions.create(**kw, response_format=fmt, stream=True))
    finally:
        worker.submit = submit
    Lookup.model_validate_json(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    assert streamed.choices[0].message.content == r.choices[0].message.content
    assert constraints[0] is not None and constraints[1] is constraints[0]  # compiled once, kept for the next
    parsed = client.chat.completions.parse(**kw, response_format=Lookup).choices[0].message.parsed
    assert isinstance(parsed, Lookup)
    obj = client.chat.completions.create(**kw, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_pydantic_function_tools_parse(flat):
    """The client's strict tools from a pydantic model: the forced call's arguments parse into the model."""
    client = client_of(flat)
    kw = dict(model="micro", messages=CHAT, max_tokens=120, temperature=0, reasoning_effort="none")
    tool = openai.pydantic_function_tool(Lookup, name="look_up")
    r = client.chat.completions.parse(**kw, tools=[tool], tool_choice="required")
    for call in r.choices[0].message.tool_calls:
        assert isinstance(call.function.parsed_arguments, Lookup)


class Checking(ScriptedEngine):
    """A scripted engine that walks its reply through each request's constraint: whether the grammar the server
    built for the request accepts that reply, whole (None: the request had no constraint)."""

    def __init__(self):
        super().__init__([[]], delay=0)
        self.verdicts: list[bool | None] = []

    def submit(self, prompt, **params):
        matcher = params["constraint"].matcher() if params.get("constraint") else None
        if matcher is None:
            self.verdicts.append(None)
        else:
            try:
                for token in self.replies[0]:
                    matcher.advance(token)
                self.verdicts.append(matcher.done)
            except ValueError:
                self.verdicts.append(False)
        return super().submit(prompt, **params)


JSON_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "lookup", "schema": LOOKUP}}}
REQUIRED = {"tools": [ADD, LOOK], "tool_choice": "required"}
LOOK_CALL = '<|tool_call|>look_up<|tool_args|>{"word":"sum","loud":true}'


@pytest.mark.parametrize("reply, extra, verdict", [
    ('<think>Hmm.</think>{"word":"port","loud":false}<|end|>', JSON_FORMAT, True),
    ('<think>Hmm.</think>{"word":"pier","loud":false}<|end|>', JSON_FORMAT, False),
    ('<think>Hmm.</think>{"word":"port"}<|end|>', JSON_FORMAT, False),
    ('<think></think>{"word":"port","loud":false}<|end|>', {**JSON_FORMAT, "reasoning_effort": "none"}, True),
    ('<think>Hmm.</think>{"word":"port","loud":false}<|end|>', {**JSON_FORMAT, "reasoning_effort": "none"}, False),
    ('<think></think>[1]<|end|>', {"response_format": {"type": "json_object"}}, False),
    ('<think>x</think>' + LOOK_CALL + '<|end|>', REQUIRED, True),
    ('<think>x</think>' + LOOK_CALL + LOOK_CALL + '<|end|>', REQUIRED, True),
    ('<think>x</think>' + LOOK_CALL + LOOK_CALL + '<|end|>', {**REQUIRED, "parallel_tool_calls": False}, False),
    ('<think>x</think>No call.<|end|>', REQUIRED, False),
    ('<think>x</think><|tool_call|>look_up<|tool_args|>{"word":"sum"}<|end|>', REQUIRED, False),
    ('<think>x</think>' + LOOK_CALL + '<|end|>',
     {"tools": [ADD, LOOK], "tool_choice": {"type": "function", "function": {"name": "add"}}}, False),
    ('<think></think>Just text.<|end|>', {"tools": [ADD]}, True),  # auto, with a strict tool
    ('<think></think><|tool_call|>add<|tool_args|>{"a":9,"b":4}<|end|>', {"tools": [ADD]}, False),
    ('<think></think><|tool_call|>define<|tool_args|>{"anything":[1]}<|end|>', {"tools": [DEFINE]}, None),
    ('<think></think>Not JSON.<|end|>', {"tools": [DEFINE], "tool_choice": "none", **JSON_FORMAT}, False),
])
def test_the_reply_grammar_is_the_requests(setup, reply, extra, verdict):
    """Which replies the constraint the server builds lets through: the schema, the tool choice, strict arguments,
    parallel_tool_calls and reasoning_effort "none" (the grammar writes the closed think block) all count."""
    _, tok = setup
    engine = Checking()
    engine.replies = [tok.encode_markup(reply)]
    with Server(None, tok, engine=engine) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "micro", "messages": CHAT, **extra})
    assert r.status_code == 200, r.text
    assert engine.verdicts == [verdict]
    if extra.get("reasoning_effort") == "none":  # the prompt is left open for the grammar to close
        assert tok.decode(engine.prompts[0]).endswith("<|assistant|>")


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("extra, param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [DEFINE, {"type": "retrieval"}]}, "tools[1].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters.type"),
    ({"tools": [DEFINE], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [DEFINE], "tool_choice": {"type": "function", "function": {"name": "add"}}},
     "tool_choice.function.name"),
    ({"tools": [DEFINE], "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
    ({"tools": [DEFINE], "tool_choice": {"type": "retrieval", "function": {"name": "define"}}}, "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": LOOKUP}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [DEFINE, {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}}}]}, "tools[1].function.parameters"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ({"chat_template_kwargs": {"namespace": 1}}, "chat_template_kwargs.namespace"),
    ({"chat_template_kwargs": "thinking"}, "chat_template_kwargs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [*CHAT, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [*CHAT, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_fields_are_400s_naming_them(plain, extra, param):
    before = len(plain.engine.prompts)
    r = httpx.post(plain.url + "/v1/chat/completions", json={"model": "micro", "messages": CHAT, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split("[")[0].split(".")[0] in error["message"]
    assert len(plain.engine.prompts) == before  # nothing reached the engine


def test_a_tokenizer_made_before_tools_is_refused_tools_only(tmp_path):
    """A leanseek tokenizer without the tool tokens: tools and tool history are a 400 saying why; a plain chat
    and a JSON reply still work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=BASE_TOKENS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    old = TextTokenizer(tk)
    assert not old.supports_tools
    history = [*CHAT, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "define", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "x"}]
    engine = Checking()
    engine.replies = [old.encode_markup('<think></think>{"a":1}<|end|>')]
    with Server(None, old, engine=engine) as s:
        tools = httpx.post(s.url + "/v1/chat/completions", json={"model": "micro", "messages": CHAT,
                                                                 "tools": [DEFINE]})
        past = httpx.post(s.url + "/v1/chat/completions", json={"model": "micro", "messages": history})
        plain = client_of(s).chat.completions.create(model="micro", messages=CHAT)
        as_json = client_of(s).chat.completions.create(model="micro", messages=CHAT,
                                                       response_format={"type": "json_object"})
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    assert "before tool support" in tools.json()["error"]["message"]
    assert past.status_code == 400 and past.json()["error"]["param"] == "messages"
    assert plain.choices[0].message.content == as_json.choices[0].message.content == '{"a":1}'
    assert engine.verdicts == [None, True]  # json_object is still enforced


# ------------------------------------------------------------------------------------------------ DeepSeek V3.1

V31 = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "user": "<｜User｜>",
       "assistant": "<｜Assistant｜>", "calls": "<｜tool▁calls▁begin｜>", "calls_end": "<｜tool▁calls▁end｜>",
       "call": "<｜tool▁call▁begin｜>", "call_end": "<｜tool▁call▁end｜>", "sep": "<｜tool▁sep｜>"}


def v31_folder(folder):
    """A folder in DeepSeek-V3.1's manner (written here from its model card's description, much reduced): tool
    definitions in the system turn, calls as NAME<｜tool▁sep｜>ARGUMENTS between its call markers, and the
    `thinking` switch choosing whether the generation prompt opens the think block or closes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = V31
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=[*t.values(), "<think>",
                                                                                       "</think>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% if tools %}## Tools\n{% for tool in tools %}{{ tool['function'] | tojson }}\n{% endfor %}"
        "{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}" + t["user"] + "{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}" + t["assistant"] + "</think>{{ m['content'] or '' }}"
        "{% if m['tool_calls'] %}" + t["calls"] + "{% for c in m['tool_calls'] %}" + t["call"] +
        "{{ c['function']['name'] }}" + t["sep"] + "{{ c['function']['arguments'] }}" + t["call_end"] +
        "{% endfor %}" + t["calls_end"] + "{% endif %}" + t["eos"] + "{% elif m['role'] == 'tool' %}"
        "<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + t["assistant"] + "{% if thinking %}<think>{% else %}</think>{% endif %}"
        "{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": t["bos"], "eos_token": t["eos"],
        "chat_template": template}))
    leanseek.save_hf(leanseek.Transformer(small_config(vocab_size=tk.get_vocab_size())), folder)
    return TextTokenizer.load(folder, strict=False)


def test_a_deepseek_v31_folder_calls_tools_in_its_format_and_thinks_on_request(tmp_path, quiet):  # noqa: F811
    from transformers import AutoTokenizer

    from leanseek.data.chat import chat_format

    tok = v31_folder(tmp_path)
    t = V31
    call = t["calls"] + t["call"] + "define" + t["sep"] + '{"word": "harbor"}' + t["call_end"] + t["calls_end"]
    thought = "Checking.</think>Sure." + call + t["eos"]
    quick = "Sure." + call + t["eos"]
    engine = ScriptedEngine([tok.encode_markup(thought), tok.encode_markup(thought), tok.encode_markup(quick)],
                            delay=0)
    with Server(None, tok, engine=engine, chat_format=chat_format(tmp_path)) as s:
        client = client_of(s)
        kw = dict(model="micro", messages=CHAT, tools=[DEFINE])
        thinking = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"thinking": True}})
        streamed, _ = accumulated(client.chat.completions.create(
            **kw, stream=True, extra_body={"chat_template_kwargs": {"thinking": True}}))
        plain = client.chat.completions.create(**kw)
        json_reply = httpx.post(s.url + "/v1/chat/completions", json={
            "model": "micro", "messages": CHAT, "response_format": {"type": "json_object"}})
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for prompt, thinks in zip(engine.prompts, (True, True, False)):
        expected = theirs.apply_chat_template(CHAT, tools=[DEFINE], add_generation_prompt=True, thinking=thinks)
        assert prompt == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    for r, reasoning in ((thinking, "Checking."), (streamed, "Checking."), (plain, "")):
        message = r.choices[0].message
        assert calls_of(message) == [("define", '{"word": "harbor"}')]
        assert message.content == "Sure." and message.model_extra["reasoning_content"] == reasoning
        assert r.choices[0].finish_reason == "tool_calls"
    assert json_reply.status_code == 400 and json_reply.json()["error"]["param"] == "response_format"
