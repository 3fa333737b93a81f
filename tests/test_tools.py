"""The built-in tools: `define` over WordNet's files (a small WordNet written here, and Debian's when installed),
run_tool's answers to bad arguments, the HTTP routes, the SFT conversations that teach the tool and their fixed
split of words, `leanseek chat` running the tools, and the probes' tool loop and scores."""

import json
import random
import re

import pytest
import torch
from conftest import ScriptedEngine, chat_session, randomise, small_config
from fastapi import FastAPI
from fastapi.testclient import TestClient

import leanseek
from leanseek import tools
from leanseek.data import instructions, train_tokenizer
from leanseek.data.builtin import WORDNET, wordnet_synsets
from leanseek.data.chat import encode_chat, validate, validate_tools
from leanseek.data.instructions import split_words, word_group
from leanseek.data.tokenizer import TOOL_CALL
from leanseek.eval import probes

HAS_WORDNET = tools.WordNet(WORDNET).available()
needs_wordnet = pytest.mark.skipif(not HAS_WORDNET, reason="needs Debian's wordnet-base")

# (words, gloss) per part of speech, and how often each lemma's senses were tagged (WordNet's order of parts)
SYNSETS = {
    "noun": [(["harbor", "seaport"], "a sheltered port where ships can take on or discharge cargo; \"a busy harbor\""),
             (["harbor", "refuge"], "a place of refuge and comfort and security"),
             (["goose"], "web-footed long-necked aquatic birds"),
             (["ice_cream"], "frozen dessert containing cream and sugar and flavoring"),
             (["fox"], "alert carnivorous mammal with pointed muzzle and ears"),
             (["fox"], "a shifty deceptive person"),
             (["fox"], "the grey or reddish-brown fur of a fox"),
             (["fox"], "a member of an Algonquian people")],
    "verb": [(["harbor", "harbour"], "maintain (a theory, thoughts, or feelings)"),
             (["run"], "move fast by using one's feet")],
    "adj": [(["quick"], "accomplished rapidly and without delay")],
    "adv": [],
}
TAGGED = {("harbor", "noun"): 1, ("harbor", "verb"): 4}
LETTER = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


def write_wordnet(root, synsets=SYNSETS, tagged=TAGGED):
    """WordNet's index.POS / data.POS files (data lines at the byte offsets their index gives) and exception
    lists."""
    root.mkdir(parents=True, exist_ok=True)
    header = "  1 This is a licence header line, as WordNet's files start with.  \n"
    for pos, entries in synsets.items():
        data, offsets = header.encode(), {}
        for words, gloss in entries:
            word_fields = " ".join(f"{w} 0" for w in words)
            line = f"{len(data):08d} 05 {LETTER[pos]} {len(words):02x} {word_fields} 000 | {gloss}  \n".encode()
            for w in words:
                offsets.setdefault(w.lower(), []).append(len(data))
            data += line
        (root / f"data.{pos}").write_bytes(data)
        index = [f"{w} {LETTER[pos]} {len(o)} 1 @ {len(o)} {tagged.get((w, pos), 0)} "
                 + " ".join(f"{x:08d}" for x in o) + "  \n" for w, o in sorted(offsets.items())]
        (root / f"index.{pos}").write_text(header + "".join(index))
    (root / "noun.exc").write_text("geese goose\nmice mouse\n")
    (root / "verb.exc").write_text("ran run\n")
    return root


@pytest.fixture
def tiny_wordnet(tmp_path, monkeypatch):
    dictionary = tools.WordNet(write_wordnet(tmp_path / "wordnet"))
    monkeypatch.setattr(tools, "wordnet", lambda: dictionary)
    split_words.cache_clear()
    yield dictionary
    split_words.cache_clear()


def test_define_reads_senses_in_order_with_inflections(tiny_wordnet):
    # the verb was seen more often in tagged text: its first sense leads, then the noun's, then the rest
    harbor = ("harbor (verb): maintain (a theory, thoughts, or feelings)\n"
              "harbor (noun): a sheltered port where ships can take on or discharge cargo\n"
              "harbor (noun): a place of refuge and comfort and security")
    assert tools.define("harbor") == harbor
    assert tools.define("Harbors") == harbor  # the detachment rules
    assert tools.define("geese") == "goose (noun): web-footed long-necked aquatic birds"  # the exception list
    assert tools.define("ice cream") == "ice cream (noun): frozen dessert containing cream and sugar and flavoring"
    assert tools.define("runs") == tools.define("ran") == "run (verb): move fast by using one's feet"
    assert len(tools.define("fox").splitlines()) == tools.MAX_SENSES == 3
    assert tools.define("xyzzy") == "no definition found for 'xyzzy'"


def test_define_without_wordnet_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "wordnet", lambda: tools.WordNet(tmp_path))
    assert "apt-get install wordnet-base" in tools.run_tool("define", '{"word": "harbor"}')


@needs_wordnet
def test_define_agrees_with_the_corpus_reader():
    """Every sense define gives for a word is a gloss of a synset that holds the word, as the built-in corpus
    (which reads the data files from start to end) has it."""
    glosses = {}
    for pos, words, gloss in wordnet_synsets():
        for w in words:
            glosses.setdefault((w.lower(), pos), set()).add(gloss.split(";")[0].strip())
    words = random.Random(0).sample(split_words()["lookup"], 40) + ["harbor", "run", "goose"]
    for word in words:
        lines = tools.define(word).splitlines()
        assert 1 <= len(lines) <= tools.MAX_SENSES
        for line in lines:
            m = re.fullmatch(r"(.+) \((noun|verb|adj|adv)\): (.*)", line)
            assert m and m[3] in glosses[(m[1], m[2])], line


def test_run_tool_answers_bad_calls_with_text(tiny_wordnet):
    run = tools.run_tool
    assert run("define", '{"word": "goose"}') == run("define", {"word": "goose"}) == tools.define("goose")
    assert run("lookup", "{}") == "error: no tool named 'lookup'; the tools are: define"
    assert run("define", '{"word": ') .startswith("error: the arguments are not JSON")
    assert run("define", '["goose"]') == "error: the arguments must be a JSON object"
    assert run("define", "{}") == "error: define needs the argument 'word'"
    assert run("define", '{"word": "goose", "lang": "en"}').startswith("error: define has no argument 'lang'")
    for bad in ('{"word": 3}', '{"word": "  "}', json.dumps({"word": "x" * 101})):
        assert run("define", bad).startswith("error: 'word' must be a non-empty string")
    [definition] = tools.tool_definitions()
    assert validate_tools([definition]) and definition["function"]["name"] == "define"


def test_tool_routes(tiny_wordnet):
    app = FastAPI()
    tools.add_tool_routes(app)
    client = TestClient(app)
    assert client.get("/v1/builtin-tools").json() == {"object": "list", "data": tools.tool_definitions()}
    r = client.post("/v1/builtin-tools/run", json={"name": "define", "arguments": '{"word": "geese"}'})
    assert r.status_code == 200 and r.json() == {"content": tools.define("goose")}
    r = client.post("/v1/builtin-tools/run", json={"name": "nope", "arguments": "{}"})
    assert r.status_code == 200 and r.json()["content"].startswith("error: no tool named 'nope'")
    for body, param in ((b"not json", "body"), (b"[1]", "body"), (b'{"arguments": "{}"}', "name"),
                        (b'{"name": "define", "arguments": 5}', "arguments")):
        r = client.post("/v1/builtin-tools/run", content=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    unable = FastAPI()  # a model whose tokenizer cannot take tools: none are offered
    tools.add_tool_routes(unable, offer=False)
    assert TestClient(unable).get("/v1/builtin-tools").json() == {"object": "list", "data": []}


def test_word_split_is_fixed_and_sized():
    assert [word_group(w) for w in ("harbor", "recur", "abject", "Abject")] == \
        ["taught", "lookup", "held_out", "held_out"]
    groups = [word_group(f"w{i}") for i in range(20000)]
    assert abs(groups.count("held_out") / len(groups) - 0.02) < 0.005
    assert abs(groups.count("lookup") / len(groups) - 0.30) < 0.015


@needs_wordnet
def test_tool_conversations_teach_the_split():
    split = split_words()
    assert len(split["held_out"]) > 1000 and all(word_group(w) == "held_out" for w in split["held_out"])
    chats = instructions.builtin_chats(seed=3, n_definitions=300, n_python=0, n_greetings=5, tasks={}, n_tools=200)
    plain = [c for c in chats if isinstance(c, list)]
    with_tools = [c for c in chats if isinstance(c, dict)]
    assert len(with_tools) == 200 and len(plain) == 305
    taught = probes.taught_definitions(plain)
    assert taught and all(word_group(w) == "taught" for w in taught)
    held_out = set(split["held_out"])
    answers = [[c[0]["content"], c[1]["content"]] for c in plain]
    tok = train_tokenizer(iter(["What does it mean? A word, a port: (noun) define"] * 20), 400)
    calls = 0
    for chat in with_tools:
        messages = validate(chat["messages"])
        assert validate_tools(chat["tools"]) == tools.tool_definitions()
        question = messages[0]["content"]
        word = instructions.DEFINITION_QUESTION.match(question)[1]
        assert word not in held_out
        if len(messages) == 2:  # answered at once, as SFT taught it
            assert [question, messages[1]["content"]] in answers and "tool_calls" not in messages[1]
            continue
        calls += 1
        assert word_group(word) == "lookup" and [m["role"] for m in messages] == ["user", "assistant", "tool",
                                                                                 "assistant"]
        [call] = messages[1]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"word": word}
        assert messages[2]["content"] == tools.define(word)
        assert messages[3]["content"] == tools.define(word).splitlines()[0] + "."
        ids, mask = encode_chat(tok, messages, tools=chat["tools"])
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        # trained on: the call and the answer; not the question, the tool definitions or the tool's result
        assert trained == (f"<think>{messages[1]['reasoning_content']}</think>{TOOL_CALL}define<|tool_args|>"
                           f"{call['function']['arguments']}<|end|><think></think>{messages[3]['content']}<|end|>")
    assert 120 < calls < 180  # a quarter answered at once
    text = json.dumps(chats)
    assert not any(f"'{w}'" in text or f'"{w}\\"' in text for w in held_out)


class Oracle:
    """A stand-in for a model that has learnt the tool, reading leanseek's chat format: it answers the words in
    `known` at once, calls define for the others (or writes the call `bad_call` gives), and answers with the
    first line of a tool result. Without tools offered, it guesses."""

    def __init__(self, tok, known=(), bad_call=None, max_len=4096):
        self.tok, self.known, self.bad_call, self.max_len = tok, set(known), bad_call, max_len
        self.prompts = []

    def generate(self, prompts, max_new_tokens, stop, **_):
        self.prompts += prompts
        return [self.tok.encode_markup(self.answer(self.tok.decode(p)) + "<|end|>") for p in prompts]

    def answer(self, text):
        word = re.findall(r"What does '(.+?)' mean\?", text)[-1]
        result = text.rpartition("<|tool|>")[2].partition("<|end|>")[0] if "<|tool|>" in text else None
        if result is not None:
            return "<think></think>" + result.splitlines()[0] + "."
        if "<|tools|>" not in text or word in self.known:
            return f"<think></think>{word} (noun): a kind of small grey bird."
        call = self.bad_call(word) if self.bad_call else f'define<|tool_args|>{{"word": "{word}"}}'
        return f"<think>I do not know the word '{word}'.</think>{TOOL_CALL}{call}"


def oracle_words(n):
    """n made-up words in the held-out group, and SYNSETS with a noun sense of each."""
    letters = (f"zk{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(676))
    words = [w for w in letters if word_group(w) == "held_out"][:n]
    synsets = {**SYNSETS, "noun": SYNSETS["noun"] + [([w], f"the zk gloss number {i} of many") for i, w in
                                                     enumerate(words)]}
    return words, synsets


@pytest.fixture
def held_out_wordnet(tmp_path, monkeypatch):
    words, synsets = oracle_words(6)
    dictionary = tools.WordNet(write_wordnet(tmp_path / "wordnet", synsets))
    monkeypatch.setattr(tools, "wordnet", lambda: dictionary)
    split_words.cache_clear()
    yield words
    split_words.cache_clear()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(["What does it mean? A word, a port: (noun) define the gloss of many"] * 20), 400)


def test_probe_scores_a_model_that_uses_the_tool(held_out_wordnet, tok):
    sft = [[{"role": "user", "content": "What does 'harbor' mean?"},
            {"role": "assistant", "content": "harbor (noun): a port."}]]
    result = probes.tool_use(Oracle(tok, known={"harbor"}), tok, sft, n=6, max_new_tokens=160)
    assert result["with tool"]["f1"] == 1.0 and result["with tool"]["n"] == 6
    assert result["with tool"]["replies with a call"] == 1.0 and result["with tool"]["well-formed calls"] == 1.0
    assert result["with tool"]["calls written"] == 6
    # the guess shares "of" with each reference, 1 word of 6 in each: F1 = 1/6
    guess = probes.gloss_f1("x (noun): a kind of small grey bird.", "x (noun): the zk gloss number 1 of many")
    assert result["without tool"]["f1"] == guess == pytest.approx(1 / 6)
    assert result["without tool"]["chance_f1"] == guess
    assert result["taught words looked up"] == 0.0
    example = result["with tool"]["examples"][0]
    assert example["calls"][0]["name"] == "define" and example["calls"][0]["result"] == example["wordnet"]
    # a word SFT mentions is not held out
    mentioned = sft + [[{"role": "user", "content": f"What does '{held_out_wordnet[0]}' mean?"},
                        {"role": "assistant", "content": "?"}]]
    assert probes.tool_use(Oracle(tok), tok, mentioned, n=10, max_new_tokens=160)["with tool"]["n"] == 5


def test_probe_counts_malformed_and_unknown_calls(held_out_wordnet, tok):
    cut = probes.tool_use(Oracle(tok, bad_call=lambda w: 'define<|tool_args|>{"word": '), tok, [], 6, 160)
    assert cut["with tool"]["calls written"] == 6 and cut["with tool"]["well-formed calls"] == 0.0
    assert cut["with tool"]["replies with a call"] == 0.0
    unknown = probes.tool_use(Oracle(tok, bad_call=lambda w: f'lookup<|tool_args|>{{"w": "{w}"}}'), tok, [], 6,
                              160)
    with_tool = unknown["with tool"]
    assert with_tool["replies with a call"] == 1.0 and with_tool["well-formed calls"] == 0.0
    # the error came back as the tool's result, and the oracle read it out
    assert with_tool["examples"][0]["reply"].startswith("error: no tool named 'lookup'")


def test_tool_replies_stop_at_the_round_bound_and_need_the_context(held_out_wordnet, tok):
    class Caller(Oracle):
        def answer(self, text):
            return f'<think></think>{TOOL_CALL}define<|tool_args|>{{"word": "goose"}}'

    engine = Caller(tok)
    [r] = probes.tool_replies(engine, tok, ["What does 'fox' mean?"], 200, max_rounds=2)
    assert len(engine.prompts) == 3 and len(r["calls"]) == 2 and r["attempts"] == 3
    # the context of the last round is the conversation as the chat template renders it
    assert engine.prompts[-1] == encode_chat(tok, [{"role": "user", "content": "What does 'fox' mean?"}]
                                             + 2 * [{"role": "assistant", "content": "", "tool_calls": [
                                                 {"id": "x", "type": "function", "function": {
                                                     "name": "define", "arguments": '{"word": "goose"}'}}]},
                                                 {"role": "tool", "tool_call_id": "x",
                                                  "content": tools.define("goose")}],
                                             add_generation_prompt=True, tools=tools.tool_definitions())[0]
    short = Caller(tok, max_len=len(engine.prompts[0]) + 64)
    with pytest.raises(ValueError, match="need a context of"):
        probes.tool_replies(short, tok, ["What does 'fox' mean?"], 64)
    assert not short.prompts


def test_probe_runs_on_a_tiny_model(held_out_wordnet, tok):
    torch.manual_seed(0)
    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size)), seed=1)
    engine = leanseek.Engine(model, tok, max_batch=8, max_len=512)
    result = probes.tool_use(engine, tok, [], n=4, max_new_tokens=8)
    for part in ("without tool", "with tool"):
        assert result[part]["n"] == 4 and 0.0 <= result[part]["f1"] <= 1.0


class StreamingScript(ScriptedEngine):
    """The scripted engine with the one-prompt stream `leanseek chat` reads."""

    max_len = 1024

    def stream(self, prompt, **params):
        rid = self.submit(prompt, **params)
        while rid in self.running:
            for out in self.step():
                if out.request == rid:
                    yield from out.tokens


CALL = '<think>I do not know it.</think>Looking it up.<|tool_call|>define<|tool_args|>{"word": "geese"}<|end|>'
ANSWER = "<think>Found.</think>goose (noun): web-footed long-necked aquatic birds.<|end|>"


def test_terminal_chat_runs_the_tool_and_goes_on(tiny_wordnet, tok):
    engine = StreamingScript([tok.encode_markup(CALL), tok.encode_markup(ANSWER)], delay=0)
    chat, text = chat_session(engine, tok, ["What does 'geese' mean?", "Thanks"], tools=True)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant", "user", "assistant",
                                                  "tool", "assistant"]
    call, result = chat.messages[1], chat.messages[2]
    assert call["content"] == "Looking it up." and call["reasoning_content"] == "I do not know it."
    assert call["tool_calls"][0]["function"] == {"name": "define", "arguments": '{"word": "geese"}'}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": tools.define("geese")}
    assert chat.messages[3]["content"] == "goose (noun): web-footed long-necked aquatic birds."
    assert f'[define({{"word": "geese"}})]\n{tools.define("geese")}\n' in text
    assert "<|tool_call|>" not in text  # the call's markup is shown as the call, not as text
    # the model went on from the tool's result, with the tools in the system turn
    assert engine.prompts[1] == encode_chat(tok, chat.messages[:3], add_generation_prompt=True,
                                            tools=tools.tool_definitions())[0]


def test_terminal_chat_tools_off_bound_and_malformed(tiny_wordnet, tok):
    engine = StreamingScript([tok.encode_markup(CALL)], delay=0)
    chat, text = chat_session(engine, tok, ["/tools off", "What does 'geese' mean?"], tools=True)
    assert "(tools off)" in text and [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[1]["content"].endswith('<|tool_call|>define<|tool_args|>{"word": "geese"}')
    assert engine.prompts[0] == encode_chat(tok, chat.messages[:1], add_generation_prompt=True)[0]

    engine = StreamingScript([tok.encode_markup(CALL)], delay=0)  # a model that never stops calling
    chat, text = chat_session(engine, tok, ["What does 'geese' mean?"], tools=True)
    assert len(engine.prompts) == 5 and "(stopped after 4 rounds of tool calls)" in text
    assert [m["role"] for m in chat.messages].count("tool") == 4

    bad = '<think></think><|tool_call|>define<|tool_args|>{"word": <|end|>'
    engine = StreamingScript([tok.encode_markup(bad)], delay=0)
    chat, text = chat_session(engine, tok, ["What does 'geese' mean?"], tools=True)
    assert len(engine.prompts) == 1 and "tool_calls" not in chat.messages[1]
    assert chat.messages[1]["content"] == '<|tool_call|>define<|tool_args|>{"word": '  # given back as text


def test_terminal_chat_refuses_tools_with_an_old_tokenizer(tiny_wordnet, monkeypatch):
    from leanseek.data import tokenizer as tokenizer_module
    from leanseek.data.tokenizer import BASE_TOKENS

    monkeypatch.setattr(tokenizer_module, "SPECIAL_TOKENS", BASE_TOKENS)  # as tokenizers were made before tools
    old = train_tokenizer(iter(["a harbor is a port"] * 20), 300)
    assert not old.supports_tools
    engine = StreamingScript([old.encode_markup("<think></think>hi<|end|>")], delay=0)
    chat, text = chat_session(engine, old, ["/tools on", "hello"], tools=True)
    assert "before tool support" in text and not chat.tools
    assert engine.prompts[0] == encode_chat(old, chat.messages[:1], add_generation_prompt=True)[0]
