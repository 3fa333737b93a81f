"""Constrained decoding on a random tiny model, whose free output is garbage: what a constrained request produces
parses and validates (checked with jsonschema, an independent validator), greedy and sampled, batched with
unconstrained requests that it leaves unchanged; leanseek's reply grammar yields well-formed tool calls (parsed
here by their token ids); control tokens appear only where the grammar puts them."""

import copy
import json
import random

import jsonschema
import llguidance
import pytest
import torch
from conftest import randomise, small_config
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import leanseek
from leanseek import Engine
from leanseek.data.tokenizer import (BASE_TOKENS, END_OF_TURN, END_THINK, THINK, TOOL_ARGS, TOOL_CALL, TextTokenizer,
                                     train_tokenizer)
from leanseek.infer.constrain import Grammar, GrammarError, allowed_tokens, reply_grammar

SCHEMAS = {
    "enums and bounds": {
        "type": "object", "additionalProperties": False, "required": ["colour", "count", "label"],
        "properties": {"colour": {"enum": ["red", "green", "blue"]},
                       "count": {"type": "integer", "minimum": 0, "maximum": 999},
                       "label": {"type": "string", "maxLength": 6}}},
    "nested": {
        "type": "object", "additionalProperties": False, "required": ["user", "tags"],
        "properties": {
            "user": {"type": "object", "additionalProperties": False, "required": ["name", "admin"],
                     "properties": {"name": {"type": "string", "maxLength": 5}, "admin": {"type": "boolean"},
                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
            "tags": {"type": "array", "minItems": 1, "maxItems": 3,
                     "items": {"type": "object", "additionalProperties": False, "required": ["k"],
                               "properties": {"k": {"enum": ["a", "b"]},
                                              "w": {"type": "number", "minimum": 0, "maximum": 1}}}}}},
    "optional and null": {
        "type": "object", "additionalProperties": False, "required": ["id"],
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                       "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
                       "ok": {"const": True}}},
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "strict": True,
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": {"type": "string", "maxLength": 8},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "define", "parameters": {"type": "object"}}},
]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "the of a weather city define word Paris red green blue true false null celsius".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) + json.dumps({"k": rng.randrange(100), "v": [1.5, None]})
             for _ in range(300)]
    return train_tokenizer(iter(texts), 400)


@pytest.fixture(scope="module")
def model(tok):
    """Random weights, and a bias on the tokens that close text, strings and structures (and on the reply's
    markup), so that garbage output still reaches the grammar's end within a short budget."""
    torch.manual_seed(0)
    m = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size)), seed=5)
    head = torch.nn.Linear(m.cfg.hidden_size, m.cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.encode('"') + tok.encode("}") + [tok.token_id(s) for s in (END_THINK, TOOL_CALL)]] = 4.0
        head.bias[tok.token_id(END_OF_TURN)] = 5.0
    m.lm_head = head
    return m.eval()


def engine(model, tok, **kw):
    return Engine(model, tok, max_batch=kw.pop("max_batch", 6), max_len=kw.pop("max_len", 192), **kw)


PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7], [9] * 12, [42, 7]]


def run(e, requests):
    """Submit (prompt, params) pairs in one batch and step until all finish: each request's tokens."""
    ids = [e.submit(p, **kw) for p, kw in requests]
    outs = {i: [] for i in ids}
    while e.pending:
        for o in e.step():
            assert o.error is None
            outs[o.request] += o.tokens
    return [outs[i] for i in ids]


@pytest.mark.parametrize("name", list(SCHEMAS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_json_outputs_parse_and_validate(model, tok, name, seed):
    """Greedy, sampled, and sampled with penalties, in one batch: every constrained output is complete JSON that
    validates, and its request ended with the grammar, well before its budget."""
    schema = SCHEMAS[name]
    grammar = Grammar.json(tok, schema)
    kinds = [dict(), dict(temperature=1.0, seed=seed), dict(temperature=1.3, top_p=0.95, seed=seed + 1,
                                                            repetition_penalty=1.3, frequency_penalty=0.5)]
    outs = run(engine(model, tok), [(PROMPTS[(seed + i) % 4], dict(max_new_tokens=150, constraint=grammar, **kw))
                                    for i, kw in enumerate(kinds)])
    for out in outs:
        assert len(out) < 150
        jsonschema.validate(json.loads(tok.decode(out)), schema)


def test_any_json_object(model, tok):
    outs = engine(model, tok).generate(PROMPTS, max_new_tokens=150, constraint=Grammar.json(tok), temperature=1.0,
                                       seed=[1, 2, 3, 4])
    assert all(isinstance(json.loads(tok.decode(o)), dict) for o in outs)


def test_greedy_is_the_argmax_among_allowed_tokens(model, tok):
    """Against step-by-step full forwards, each token the most likely one under llguidance's own mask (one
    matcher of its own, its byte-per-token form, not the batched bitmask the engine unpacks)."""
    grammar = Grammar.json(tok, SCHEMAS["nested"])
    out = engine(model, tok).generate([PROMPTS[1]], max_new_tokens=150, constraint=grammar)[0]
    vocab = llguidance.LLTokenizer(tok.tk.to_str(), eos_token=tok.eos_id)
    matcher = llguidance.LLMatcher(vocab, llguidance.LLMatcher.grammar_from_lark(grammar.source))
    ids, ref = list(PROMPTS[1]), []
    with torch.no_grad():
        while not matcher.is_stopped():
            logits = model(torch.tensor([ids]))[0, -1]
            allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8) > 0
            token = int(logits[: len(allowed)].masked_fill(~allowed, float("-inf")).argmax())
            assert matcher.consume_token(token)
            ids.append(token)
            ref.append(token)
    assert out == ref


def test_unconstrained_neighbours_are_unchanged(model, tok):
    e = engine(model, tok)
    plain = [dict(), dict(temperature=1.0, seed=7)]
    alone = [e.generate([PROMPTS[i]], max_new_tokens=20, **kw)[0] for i, kw in enumerate(plain)]
    grammar = Grammar.json(tok, SCHEMAS["enums and bounds"])
    outs = run(e, [(PROMPTS[i], dict(max_new_tokens=20, **kw)) for i, kw in enumerate(plain)]
               + [(PROMPTS[2 + i], dict(max_new_tokens=150, constraint=grammar, temperature=t, seed=i))
                  for i, t in enumerate([0.0, 1.0])])
    assert outs[:2] == alone
    for out in outs[2:]:
        jsonschema.validate(json.loads(tok.decode(out)), SCHEMAS["enums and bounds"])


def test_a_complete_grammar_finishes_the_request(model, tok):
    """The request ends when the matcher can take nothing more, with no stop token asked for."""
    e = engine(model, tok)
    rid = e.submit([1, 2], max_new_tokens=100, constraint=Grammar.json(tok, {"enum": ["celsius"]}))
    outs = []
    while e.pending:
        outs += e.step()
    assert tok.decode(t for o in outs for t in o.tokens) == '"celsius"'
    assert outs[-1].finished and outs[-1].request == rid and outs[-1].error is None


def test_constrained_requests_skip_speculation(tok):
    m = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=1)), seed=2)
    grammar = Grammar.json(tok, SCHEMAS["enums and bounds"])
    e = Engine(m, tok, max_batch=2, max_len=192)
    spec = e.generate(PROMPTS[:2], max_new_tokens=150, constraint=grammar, speculative=True)
    assert spec == e.generate(PROMPTS[:2], max_new_tokens=150, constraint=grammar)
    assert e.stats["drafted"] == 0


def split_reply(tok, out):
    """A reply in leanseek's format cut at its control tokens: (reasoning, content, [(name, args)]), or an
    AssertionError if it is not one."""
    ids = {s: tok.token_id(s) for s in (THINK, END_THINK, TOOL_CALL, TOOL_ARGS, END_OF_TURN)}
    assert out[0] == ids[THINK] and out[-1] == ids[END_OF_TURN]
    close = out.index(ids[END_THINK])
    body = out[close + 1:-1]
    control = set(tok.control_tokens.values())
    assert control.isdisjoint(out[1:close])
    starts = [i for i, t in enumerate(body) if t == ids[TOOL_CALL]]
    calls = []
    for a, b in zip(starts, starts[1:] + [len(body)]):
        call = body[a + 1:b]
        sep = call.index(ids[TOOL_ARGS])
        assert control.isdisjoint(call[:sep] + call[sep + 1:])
        calls.append((tok.decode(call[:sep]), tok.decode(call[sep + 1:])))
    content = body[:starts[0]] if starts else body
    assert control.isdisjoint(content)
    return tok.decode(out[1:close]), tok.decode(content), calls


def check_calls(calls):
    tools = {t["function"]["name"]: t["function"] for t in TOOLS}
    for name, args in calls:
        assert name in tools
        args = json.loads(args)
        assert isinstance(args, dict)
        if tools[name].get("strict"):
            jsonschema.validate(args, tools[name]["parameters"])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_reply_grammar_tool_calls(model, tok, seed):
    """required: at least one call; a named function without parallel calls: exactly one call, to it; auto:
    content alone or calls. Every call names a tool, its arguments a JSON object, valid for the strict tool."""
    cases = [(dict(tool_choice="required"), lambda calls: len(calls) >= 1),
             (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel=False),
              lambda calls: [n for n, _ in calls] == ["get_weather"]),
             (dict(tool_choice="auto"), lambda calls: True)]
    requests = [(PROMPTS[i], dict(max_new_tokens=200, temperature=1.0, seed=seed + i,
                                  constraint=reply_grammar(tok, "leanseek", tools=TOOLS, **kw)))
                for i, (kw, _) in enumerate(cases)]
    for out, (kw, expect) in zip(run(engine(model, tok, max_len=256), requests), cases):
        _, _, calls = split_reply(tok, out)
        assert expect(calls), (kw, calls)
        check_calls(calls)


def test_free_tokens_bound_the_free_text_before_a_required_call(model, tok):
    """A model that never closes its reasoning or its lead-in text (the closers are masked out of its logits) still
    calls within its budget: free_tokens caps each free part."""
    rambler = copy.deepcopy(model)
    with torch.no_grad():
        rambler.lm_head.bias[[tok.token_id(END_THINK), tok.token_id(TOOL_CALL)]] = -30.0
    grammar = reply_grammar(tok, "leanseek", tools=TOOLS, tool_choice="required", parallel=False, free_tokens=6)
    (out,) = engine(rambler, tok).generate([PROMPTS[0]], max_new_tokens=60, constraint=grammar)
    _, _, calls = split_reply(tok, out)
    close, call = out.index(tok.token_id(END_THINK)), out.index(tok.token_id(TOOL_CALL))
    assert close - 1 <= 6 and call - close - 1 <= 6 and len(calls) == 1  # reasoning and lead-in: 6 tokens at most
    check_calls(calls)
    unbounded = reply_grammar(tok, "leanseek", tools=TOOLS, tool_choice="required", parallel=False)
    (out,) = engine(rambler, tok).generate([PROMPTS[0]], max_new_tokens=60, constraint=unbounded)
    assert tok.token_id(END_THINK) not in out  # without the bound, it rambles to the end of its budget


def test_reply_grammar_json_content(model, tok):
    e = engine(model, tok, max_len=256)
    for kw in (dict(json_schema=SCHEMAS["nested"]), dict(any_json=True), dict(json_schema=SCHEMAS["nested"],
                                                                              think=False)):
        grammar = reply_grammar(tok, "leanseek", **kw)
        for out in e.generate(PROMPTS, max_new_tokens=200, constraint=grammar, temperature=1.0, seed=[1, 2, 3, 4]):
            reasoning, content, calls = split_reply(tok, out)
            assert not calls
            if not kw.get("think", True):
                assert reasoning == ""
            value = json.loads(content)
            jsonschema.validate(value, kw.get("json_schema", {"type": "object"}))


def allowed_control(tok, matcher):
    allowed = allowed_tokens([matcher], tok.vocab_size)[0]
    return {s for s, i in tok.control_tokens.items() if allowed[i]}


def walk(tok, matcher, pieces):
    for p in pieces:
        for t in [tok.token_id(p)] if p in tok.control_tokens else tok.encode(p):
            matcher.advance(t)
    return matcher


def test_control_tokens_only_where_the_grammar_says(tok):
    g = reply_grammar(tok, "leanseek", tools=TOOLS)
    assert allowed_control(tok, g.matcher()) == {THINK}
    assert allowed_control(tok, walk(tok, g.matcher(), [THINK, "let me see <|end|>"])) == {END_THINK}
    content = walk(tok, g.matcher(), [THINK, END_THINK, "Sure"])
    assert allowed_control(tok, content) == {TOOL_CALL, END_OF_TURN}
    assert allowed_control(tok, walk(tok, content, [TOOL_CALL, "get"])) == set()
    args = walk(tok, g.matcher(), [THINK, END_THINK, TOOL_CALL, "get_weather", TOOL_ARGS, '{"city":"Pa'])
    assert allowed_control(tok, args) == set()
    assert allowed_control(tok, walk(tok, args, ['ris","unit":"celsius"}'])) == {TOOL_CALL, END_OF_TURN}
    plain = reply_grammar(tok, "leanseek")
    assert allowed_control(tok, walk(tok, plain.matcher(), [THINK, END_THINK, "hi"])) == {END_OF_TURN}
    none = reply_grammar(tok, "leanseek", tools=TOOLS, tool_choice="none")
    assert allowed_control(tok, walk(tok, none.matcher(), [THINK, END_THINK])) == {END_OF_TURN}


def test_a_foreign_tokenizers_added_tokens_are_never_text():
    """A tokenizer in DeepSeek's style (its own special tokens, think tags added as non-special tokens): every
    added token is kept out of text and JSON; a complete text may end with its end-of-sentence token."""
    eos, user = "<｜end▁of▁sentence｜>", "<｜User｜>"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["a city, the weather: {\"k\": [1, 2]}"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<｜begin▁of▁sentence｜>", eos, user],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens(["<think>", "</think>"])
    foreign = TextTokenizer(tk, strict=False)
    added = set(foreign.control_tokens.values())
    assert len(added) == 5

    def allowed(m):
        return set(allowed_tokens([m], foreign.vocab_size)[0].nonzero()[:, 0].tolist()) & added

    text = Grammar.text(foreign).matcher()
    assert allowed(text) == {foreign.token_id(eos)}  # empty text is complete
    walk(foreign, text, [f"{user} <think> says"])
    assert allowed(text) == {foreign.token_id(eos)}
    text.advance(foreign.token_id(eos))
    assert text.done
    data = Grammar.json(foreign).matcher()
    for piece in ('{"', "<think>", '":"', user):  # as text
        for t in foreign.encode(piece):
            data.advance(t)
        assert allowed(data) == set()


def test_errors_are_clear(model, tok):
    with pytest.raises(GrammarError, match="Invalid type: strin"):
        Grammar.json(tok, {"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(GrammarError, match='unknown name: "foo"'):
        Grammar.lark(tok, "start: foo\n")
    assert Grammar.lark(tok, 'start: "yes" | "no"\n').matcher().allows(tok.encode("yes")[0])
    with pytest.raises(GrammarError, match="'nope', which is not among the tools"):
        reply_grammar(tok, "leanseek", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(GrammarError, match="needs tools"):
        reply_grammar(tok, "leanseek", tool_choice="required")
    with pytest.raises(GrammarError, match="leanseek's chat format"):
        reply_grammar(tok, "deepseek_v3", any_json=True)
    before_tools = Tokenizer(models.BPE())
    before_tools.train_from_iterator(["a tokenizer made before tool support"] * 4,
                                     trainers.BpeTrainer(vocab_size=300, special_tokens=BASE_TOKENS))
    old = TextTokenizer(before_tools)
    with pytest.raises(GrammarError, match=r"no <\|tool_call\|> token"):
        reply_grammar(old, "leanseek", tools=TOOLS)
    with pytest.raises(ValueError, match="constraint must be a Grammar"):
        engine(model, tok).submit([1], constraint={"type": "object"})
