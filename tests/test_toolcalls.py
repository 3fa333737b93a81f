"""Tool-call parsers (leanseek.serve.toolcalls) against model outputs written from docs/tool-call-formats.md: whole
and cut into arbitrary stream chunks, several calls, content before them, malformed and cut-off calls (content,
never an exception), marker spellings that are not calls, and round trips through chat templates written here in
each DeepSeek format's shape (and leanseek's own template) from OpenAI tool_calls."""

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from leanseek.data.chat import LEANSEEK_CHAT, ChatFormat
from leanseek.serve.toolcalls import FORMATS, ToolCallParser, format_name, tool_parser

EOS = "<｜end▁of▁sentence｜>"


# The answer text each format writes for some content and calls [(name, arguments dict)], from the doc.
def write_leanseek(content, calls):
    return content + "".join(f"<|tool_call|>{n}<|tool_args|>{json.dumps(a)}" for n, a in calls)


def write_v3(content, calls, indent=None):
    return content + "<｜tool▁calls▁begin｜>" + "\n".join(
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{json.dumps(a, indent=indent)}\n```<｜tool▁call▁end｜>"
        for n, a in calls) + "<｜tool▁calls▁end｜>"


def write_v31(content, calls):
    return content + "<｜tool▁calls▁begin｜>" + "".join(
        f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{json.dumps(a, ensure_ascii=False)}<｜tool▁call▁end｜>"
        for n, a in calls) + "<｜tool▁calls▁end｜>"


def dsml_parameter(key, value):
    is_string = isinstance(value, str)
    written = value if is_string else json.dumps(value, ensure_ascii=False)
    return f'<｜DSML｜parameter name="{key}" string="{"true" if is_string else "false"}">{written}</｜DSML｜parameter>'


def write_dsml(content, calls, block="function_calls"):
    invokes = [f'<｜DSML｜invoke name="{n}">\n' + "\n".join(dsml_parameter(k, v) for k, v in a.items())
               + "\n</｜DSML｜invoke>" for n, a in calls]
    return content + f"\n\n<｜DSML｜{block}>\n" + "\n".join(invokes) + f"\n</｜DSML｜{block}>"


WRITERS = {
    "leanseek": write_leanseek,
    "deepseek_v3": write_v3,
    "deepseek_v31": write_v31,
    "deepseek_dsml": write_dsml,
}


def parse(fmt: str, pieces) -> tuple[str, list[tuple[str, dict]], list]:
    """(content, [(name, arguments as an object)], deltas) of a reply fed in `pieces`; checks the streaming
    contract on the way: each call's first delta names it, its argument deltas concatenate to its arguments."""
    parser = ToolCallParser(FORMATS[fmt])
    content, deltas = "", []
    for piece in [*pieces, None]:
        text, new = parser.finish() if piece is None else parser.feed(piece)
        content += text
        deltas += new
    for i, call in enumerate(parser.calls):
        mine = [d for d in deltas if d.index == i]
        assert mine[0].name == call.name and all(d.name is None for d in mine[1:])
        assert "".join(d.arguments for d in mine) == call.arguments
    assert sorted({d.index for d in deltas}) == list(range(len(parser.calls)))
    return content, [(c.name, json.loads(c.arguments)) for c in parser.calls], deltas


NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)
# text with the characters the markers are made of, so partial markers and near misses turn up
TEXT = st.lists(st.sampled_from([*"ab <>|｜▁/\n`\"{}=tool_calsbegin", "é", "DSML", "json"]), max_size=30).map("".join)
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | TEXT,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6)
ARGS = st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), VALUES, max_size=4)
CALLS = st.lists(st.tuples(NAMES, ARGS), min_size=1, max_size=3)


def no_marker(fmt: str, text: str) -> bool:
    """Whether `text` (content written before the calls) cannot itself open a call block."""
    return not any(s in text for s in FORMATS[fmt].sections or [FORMATS[fmt].call_begin])


def cut(text: str, points: list[int]) -> list[str]:
    points = sorted({p % (len(text) + 1) for p in points})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@pytest.mark.parametrize("fmt", list(FORMATS))
@settings(max_examples=80, deadline=None)
@given(content=TEXT, calls=CALLS, points=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_chunking_gives_the_written_calls(fmt, content, calls, points):
    """Whole or cut anywhere (markers split across chunks), the content and calls are those written, for several
    calls with content before them; a DSML string parameter is the string as written, other values JSON."""
    assume(no_marker(fmt, content))
    text = WRITERS[fmt](content, calls)
    whole = parse(fmt, [text])
    assert whole[:2] == (content, [(n, a) for n, a in calls])
    assert parse(fmt, cut(text, points))[:2] == whole[:2]
    assert parse(fmt, list(text))[:2] == whole[:2]  # one character at a time


@pytest.mark.parametrize("fmt", list(FORMATS))
@given(content=TEXT)
@settings(max_examples=80, deadline=None)
def test_text_without_calls_is_all_content(fmt, content):
    assert parse(fmt, [content])[:2] == (content, [])
    assert parse(fmt, list(content))[:2] == (content, [])


def test_content_streams_before_the_calls_and_holds_back_only_a_possible_marker():
    parser = ToolCallParser(FORMATS["deepseek_v31"])
    assert parser.feed("Let me check<｜tool▁c") == ("Let me check", [])
    assert parser.feed("alls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": 1}") == ("", [])
    text, deltas = parser.feed("<｜tool▁call▁end｜>")
    assert (text, [(d.index, d.name, d.arguments) for d in deltas]) == ("", [(0, "f", '{"a": 1}')])
    assert parser.feed("<｜tool▁calls▁end｜>") == ("", [])
    assert parser.finish() == ("", [])
    dsml = ToolCallParser(FORMATS["deepseek_dsml"])
    assert dsml.feed("Sure.\n") == ("Sure.", [])  # the newline may be the blank line before a DSML block
    assert dsml.feed("\nNo tools needed.") == ("\n\nNo tools needed.", [])


@pytest.mark.parametrize("block", ["function_calls", "tool_calls"])
def test_dsml_blocks_of_v32_and_v4(block):
    """V3.2 writes <｜DSML｜function_calls>, V4 <｜DSML｜tool_calls>; values typed by their string attribute."""
    calls = [("get_weather", {"city": "New York", "days": 3, "units": None, "tags": ["a", "b"], "raw": "3"}),
             ("search", {"query": "  spaced \"quoted\"\nlines  ", "filters": {"year": 2025, "open": True}})]
    text = write_dsml("Checking.", calls, block)
    assert parse("deepseek_dsml", [text])[:2] == ("Checking.", calls)


def test_v3_arguments_may_span_lines():
    calls = [("f", {"a": [1, 2], "b": {"c": "d"}}), ("g", {})]
    assert parse("deepseek_v3", [write_v3("", calls, indent=2)])[:2] == ("", calls)


BAD = [  # (format, reply with one good call then a malformed one, the content the parser must give back)
    ("leanseek", 'Hi<|tool_call|>f<|tool_args|>{"a": 1}<|tool_call|>g<|tool_args|>{"a": 1,}',
     'Hi<|tool_call|>g<|tool_args|>{"a": 1,}'),
    ("leanseek", 'Hi<|tool_call|>f<|tool_args|>{"a": 1}<|tool_call|>g<|tool_args|>[1, 2]',
     "Hi<|tool_call|>g<|tool_args|>[1, 2]"),
    ("leanseek", 'Hi<|tool_call|>f<|tool_args|>{"a": 1}<|tool_call|>no args', "Hi<|tool_call|>no args"),
    ("leanseek", 'Hi<|tool_call|>f<|tool_args|>{"a": 1}<|tool_call|>two words<|tool_args|>{}',
     "Hi<|tool_call|>two words<|tool_args|>{}"),
    ("deepseek_v3", "Hi<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1}\n```"
     "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{a: 1}\n```<｜tool▁call▁end｜>"
     "<｜tool▁calls▁end｜>",
     "Hi\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{a: 1}\n```<｜tool▁call▁end｜>"),
    ("deepseek_v3", "Hi<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1}\n```"
     "<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n{\"a\": 1}<｜tool▁call▁end｜>"
     "<｜tool▁calls▁end｜>",  # no fence
     "Hi<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n{\"a\": 1}<｜tool▁call▁end｜>"),
    ("deepseek_v31", "Hi<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": 1}<｜tool▁call▁end｜>"
     "<｜tool▁call▁begin｜>g<｜tool▁sep｜>{\"a\": 1<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
     "Hi<｜tool▁call▁begin｜>g<｜tool▁sep｜>{\"a\": 1<｜tool▁call▁end｜>"),
    *[("deepseek_dsml", write_dsml("Hi", [("f", {"a": 1})]).replace("\n</｜DSML｜function_calls>", "\n")
       + bad + "\n</｜DSML｜function_calls>", "Hi\n" + bad) for bad in (
        '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="n" string="false">1 2</｜DSML｜parameter>\n</｜DSML｜invoke>',
        '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="n" string="maybe">1</｜DSML｜parameter>\n</｜DSML｜invoke>',
        '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="n" string="true">1</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>',  # a key twice
        '<｜DSML｜invoke name="g">\nn = 1\n</｜DSML｜invoke>',
    )],
]


@pytest.mark.parametrize("fmt,text,content", BAD)
def test_a_malformed_call_comes_back_as_content(fmt, text, content):
    """Arguments that are not a JSON object, a missing separator or fence, a bad DSML value: that call's text, as
    the model wrote it, is content; the good call before it is still a call. Streamed or not."""
    for pieces in ([text], list(text)):
        got_content, calls, _ = parse(fmt, pieces)
        assert (got_content, calls) == (content, [("f", {"a": 1})])


@pytest.mark.parametrize("fmt", ["leanseek", "deepseek_dsml"])
def test_arguments_nested_too_deep_for_json_are_content(fmt):
    deep = "[" * 100_000 + "]" * 100_000
    text = (f"<|tool_call|>f<|tool_args|>{{\"a\": {deep}}}" if fmt == "leanseek" else
            write_dsml("", [("f", {})]).replace("\n</｜DSML｜invoke>", dsml_parameter("a", 1).replace("1", deep)
                                                + "\n</｜DSML｜invoke>"))
    assert parse(fmt, [text])[:2] == (text, [])


@pytest.mark.parametrize("fmt", list(FORMATS))
@settings(max_examples=40, deadline=None)
@given(content=TEXT, calls=CALLS)
def test_a_reply_cut_off_anywhere(fmt, content, calls):
    """A reply that stops anywhere (max_tokens) never raises: the calls found are the first of those written,
    the content starts with what was written before them, and with no complete call it is the whole text."""
    assume(no_marker(fmt, content))
    text = WRITERS[fmt](content, calls)
    for end in range(len(content), len(text) + 1):
        got_content, got_calls, _ = parse(fmt, [text[:end]])
        assert got_calls == calls[: len(got_calls)]
        assert got_content.startswith(content)
        if not got_calls:
            assert got_content == text[:end]


@pytest.mark.parametrize("fmt,text", [
    ("leanseek", "Use <|tool_args|> after a name, like f<|tool_args|>{}."),
    ("deepseek_v3", "The separator is <｜tool▁sep｜>, and ```json\n{}\n``` is a fence."),
    ("deepseek_v3", "A call alone: <｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜>"),
    ("deepseek_v31", "<｜tool▁calls▁end｜> closes, <｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜> calls."),
    ("deepseek_v31", "An empty block: <｜tool▁calls▁begin｜><｜tool▁calls▁end｜> and on."),
    ("deepseek_v31", "<｜tool▁calls▁begin｜>not a call <｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>"),
    ("deepseek_dsml", 'In DSML, <｜DSML｜invoke name="f">\n</｜DSML｜invoke> sits inside a block.'),
    ("deepseek_dsml", "Blocks open with <｜DSML｜tool_calls"),
    ("deepseek_dsml", "<｜DSML｜function_calls>\nplain words\n</｜DSML｜function_calls>"),
])
def test_marker_spellings_that_are_not_calls_are_content(fmt, text):
    for pieces in ([text], list(text)):
        assert parse(fmt, pieces)[:2] == (text, [])


def test_text_after_a_call_block_is_content():
    text = write_v31("Before.", [("f", {"a": 1})]) + " After."
    assert parse("deepseek_v31", [text])[:2] == ("Before. After.", [("f", {"a": 1})])


# Chat templates written here in the shape of each DeepSeek format (docs/tool-call-formats.md): the user turn, then
# an assistant turn with its content and OpenAI tool_calls (arguments as JSON text for V3/V3.1, as an object for
# DSML, whose encoder reads the object), ended by the end of sentence.
V3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] or '' }}{% if m['tool_calls'] %}"
    "<｜tool▁calls▁begin｜>{% for t in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}<｜tool▁call▁begin｜>"
    "{{ t['type'] }}<｜tool▁sep｜>{{ t['function']['name'] }}\n```json\n{{ t['function']['arguments'] }}\n```"
    "<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}{{ eos_token }}{% endif %}{% endfor %}")
V31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] or '' }}{% if m['tool_calls'] %}"
    "<｜tool▁calls▁begin｜>{% for t in m['tool_calls'] %}<｜tool▁call▁begin｜>{{ t['function']['name'] }}"
    "<｜tool▁sep｜>{{ t['function']['arguments'] }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}"
    "{{ eos_token }}{% endif %}{% endfor %}")
DSML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] or '' }}{% if m['tool_calls'] %}"
    "{{ '\\n\\n' }}<｜DSML｜BLOCK>{{ '\\n' }}{% for t in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<｜DSML｜invoke name=\"{{ t['function']['name'] }}\">\n"
    "{% for k, v in t['function']['arguments'].items() %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<｜DSML｜parameter name=\"{{ k }}\" string=\"{{ 'true' if v is string else 'false' }}\">"
    "{% if v is string %}{{ v }}{% else %}{{ v | tojson }}{% endif %}</｜DSML｜parameter>{% endfor %}"
    "{{ '\\n' }}</｜DSML｜invoke>{% endfor %}{{ '\\n' }}</｜DSML｜BLOCK>{% endif %}{{ eos_token }}{% endif %}{% endfor %}")
TEMPLATES = {
    "deepseek_v3": (V3_TEMPLATE, "<｜Assistant｜>", True),
    "deepseek_v31": (V31_TEMPLATE, "<｜Assistant｜></think>", True),
    "deepseek_v32": (DSML_TEMPLATE.replace("BLOCK", "function_calls"), "<｜Assistant｜></think>", False),
    "deepseek_v4": (DSML_TEMPLATE.replace("BLOCK", "tool_calls"), "<｜Assistant｜></think>", False),
}


@pytest.mark.parametrize("model", list(TEMPLATES))
@settings(max_examples=40, deadline=None)
@given(content=TEXT, calls=CALLS, points=st.lists(st.integers(0, 10**6), max_size=8))
def test_round_trip_through_a_deepseek_template(model, content, calls, points):
    """OpenAI tool_calls rendered by a template in the format's shape come back out of the assistant's text, the
    template picking the parser."""
    template, opener, arguments_as_text = TEMPLATES[model]
    chat = ChatFormat(template, EOS, {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": EOS})
    make = tool_parser(chat)
    fmt = make().fmt.name
    assume(no_marker(fmt, content))
    tool_calls = [{"id": f"call_{i}", "type": "function",
                   "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False) if arguments_as_text else a}}
                  for i, (n, a) in enumerate(calls)]
    rendered = chat.render([{"role": "user", "content": "q"},
                            {"role": "assistant", "content": content, "tool_calls": tool_calls}])
    answer = rendered.split(opener, 1)[1].removesuffix(EOS)
    assert parse(fmt, cut(answer, points))[:2] == (content, calls)


@settings(max_examples=40, deadline=None)
@given(content=TEXT, calls=CALLS, points=st.lists(st.integers(0, 10**6), max_size=8))
def test_round_trip_through_leanseeks_template(content, calls, points):
    assume(no_marker("leanseek", content))
    tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                  for i, (n, a) in enumerate(calls)]
    rendered = LEANSEEK_CHAT.render([{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": content, "tool_calls": tool_calls}])
    answer = rendered.split("<|assistant|><think></think>", 1)[1].removesuffix("<|end|>")
    assert tool_parser(LEANSEEK_CHAT)().fmt.name == "leanseek"
    assert parse("leanseek", cut(answer, points))[:2] == (content, calls)


def test_which_format_a_template_writes():
    assert format_name(LEANSEEK_CHAT.template) == "leanseek"
    assert [format_name(TEMPLATES[m][0]) for m in TEMPLATES] == [
        "deepseek_v3", "deepseek_v31", "deepseek_dsml", "deepseek_dsml"]
    plain = ChatFormat("{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}", EOS)
    assert tool_parser(plain) is None
