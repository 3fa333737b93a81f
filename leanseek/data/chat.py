"""The chat format: system, user and assistant turns, the assistant's reasoning in <think>...</think> before its
answer, tool definitions, tool calls and tool results. One Jinja template, saved in tokenizer_config.json as
`chat_template`, so transformers' `apply_chat_template(messages, tools=tools)` renders exactly what leanseek
trains on:

    <|bos|><|system|>SYSTEM<|tools|>TOOLS<|end|><|user|>QUESTION<|end|>
    <|assistant|><think>REASONING</think>TEXT<|tool_call|>NAME<|tool_args|>ARGUMENTS<|end|>
    <|tool|>RESULT<|end|><|assistant|><think>REASONING</think>ANSWER<|end|>

(one line in fact). Every assistant turn has a think block (empty when there is no reasoning), so a model always
opens one; a generation prompt ends with `<|assistant|>`. With tools, the first turn is a system turn (the system
message's text, if the conversation starts with one) whose `<|tools|>` part is the tool definitions as compact JSON
(`json.dumps(tools, ensure_ascii=False, separators=(",", ":"))`). An assistant turn's calls follow its text, each
`<|tool_call|>NAME<|tool_args|>ARGUMENTS` with the arguments' JSON text as sent (a dict is written as
`json.dumps(arguments, ensure_ascii=False)`); each tool message is a `<|tool|>` turn, in order. Reasoning is
written only for the assistant messages after the last user message (the turn in progress, while it calls tools);
earlier turns get an empty think block, as DeepSeek's API drops them.

Conversations are OpenAI `messages` lists; assistant messages may carry `reasoning_content`, as in DeepSeek's API.

Message text is text: `ChatFormat.encode` gives control tokens only to the template's own markup, for any template
(leanseek's or a Hugging Face folder's), so a message, tool definition, call or result that spells
"<|end|><|assistant|>" cannot end its turn or open a forged one.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import (ASSISTANT, BASE_TOKENS, BOS, END_OF_TURN, END_THINK, EOS, SYSTEM, THINK, TOOL, TOOL_ARGS,
                        TOOL_CALL, TOOLS, USER, TextTokenizer)

CHAT_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    + BOS +
    "{% if tools %}" + SYSTEM + "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% endif %}" + TOOLS + "{{ tools | tojson(separators=(',', ':')) }}" + END_OF_TURN + "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not (tools and loop.first) %}" + SYSTEM + "{{ m['content'] }}" + END_OF_TURN +
    "{% endif %}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}" + END_OF_TURN +
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + THINK +
    "{% if loop.index0 > ns.last_user and m['reasoning_content'] %}{{ m['reasoning_content'] }}{% endif %}" +
    END_THINK + "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for call in m['tool_calls'] or [] %}" + TOOL_CALL + "{{ call['function']['name'] }}" + TOOL_ARGS +
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}{% endfor %}" + END_OF_TURN +
    "{% elif m['role'] == 'tool' %}" + TOOL + "{{ m['content'] }}" + END_OF_TURN +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function and response-format names


def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja as transformers sets it up for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise ChatError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter, not Jinja's (which escapes <, >, & and ' for HTML)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    return env


class ChatError(ValueError):
    """A conversation that is not a valid messages list; `param` is the field's path (e.g.
    "messages[1].content[0].type"), which the message names too."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _failing(where: str):
    def fail(param: str, problem: str):
        raise ChatError(f"{where}: {param}: {problem}" if where else f"{param}: {problem}", param)
    return fail


def validate(messages, where: str = "conversation") -> list[dict]:
    """The conversation normalised to what the templates read (new dicts of role, content, and name,
    reasoning_content, tool_calls and tool_call_id when given; other fields are left out): "developer" is "system",
    a list of text parts is joined into one string, an assistant's missing or null content is "", a tool call's
    arguments are JSON text (a dict is dumped). A tool message must answer a call of an earlier assistant message
    not yet answered. Raises ChatError for anything else (parts that are not text, `function_call`)."""
    fail = _failing(where)
    if not isinstance(messages, list) or not messages:
        fail("messages", "must be a non-empty list")
    normal, pending = [], set()  # the ids of the calls not yet answered
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            fail(at, "must be an object with 'role' and 'content'")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            fail(f"{at}.role", "must be one of system, developer, user, assistant, tool")
        if m.get("function_call"):
            fail(f"{at}.function_call", "is not supported: send tool_calls")
        if m.get("tool_calls") and role != "assistant":
            fail(f"{at}.tool_calls", "only an assistant message makes tool calls")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            content = "".join(_text_part(part, f"{at}.content[{j}]", fail) for j, part in enumerate(content))
        elif not isinstance(content, str):
            fail(f"{at}.content", "must be a string or a list of text parts")
        out = {"role": role, "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                fail(f"{at}.name", "must be a string")
            out["name"] = m["name"]
        if m.get("reasoning_content") is not None:
            if role != "assistant" or not isinstance(m["reasoning_content"], str):
                fail(f"{at}.reasoning_content", "must be a string on an assistant message")
            out["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls"):
            out["tool_calls"] = _tool_calls(m["tool_calls"], f"{at}.tool_calls", pending, fail)
        if role == "tool":
            call = m.get("tool_call_id")
            if not isinstance(call, str):
                fail(f"{at}.tool_call_id", "must be the string id of the call it answers")
            if call not in pending:
                fail(f"{at}.tool_call_id", f"{call!r} answers no call of an earlier assistant message (or one "
                                           "already answered)")
            pending.remove(call)
            out["tool_call_id"] = call
        elif m.get("tool_call_id") is not None:
            fail(f"{at}.tool_call_id", "only a tool message answers a call")
        normal.append(out)
    return normal


def _tool_calls(calls, at: str, pending: set, fail) -> list[dict]:
    if not isinstance(calls, list):
        fail(at, "must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        here = f"{at}[{j}]"
        if not isinstance(call, dict):
            fail(here, "must be an object with 'id', 'type' and 'function'")
        if not isinstance(call.get("id"), str) or not call["id"]:
            fail(f"{here}.id", "must be a non-empty string")
        if call["id"] in pending:
            fail(f"{here}.id", f"{call['id']!r} is the id of another call not yet answered")
        if call.get("type", "function") != "function":
            fail(f"{here}.type", "must be 'function'")
        function = call.get("function")
        if not isinstance(function, dict):
            fail(f"{here}.function", "must be an object with 'name' and 'arguments'")
        if not isinstance(function.get("name"), str) or not function["name"]:
            fail(f"{here}.function.name", "must be a non-empty string")
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        elif not isinstance(arguments, str):
            fail(f"{here}.function.arguments", "must be a JSON string (or an object)")
        pending.add(call["id"])
        out.append({"id": call["id"], "type": "function", "function": {"name": function["name"],
                                                                         "arguments": arguments}})
    return out


def validate_tools(tools, where: str = "") -> list[dict]:
    """OpenAI tool definitions, normalised to {"type": "function", "function": {"name", and "description",
    "parameters", "strict" when given}} (other fields are left out). Raises ChatError naming the field: a name
    must match [A-Za-z0-9_-]{1,64} and be unique, parameters must be a JSON Schema object."""
    fail = _failing(where)
    if not isinstance(tools, list):
        fail("tools", "must be a list of tool definitions")
    out, names = [], set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            fail(at, "must be an object with 'type' and 'function'")
        if tool.get("type") != "function":
            fail(f"{at}.type", "must be 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            fail(f"{at}.function", "must be an object with 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            fail(f"{at}.function.name", "must be 1 to 64 letters, digits, underscores or dashes")
        if name in names:
            fail(f"{at}.function.name", f"{name!r} names two tools")
        names.add(name)
        normal = {"name": name}
        if function.get("description") is not None:
            if not isinstance(function["description"], str):
                fail(f"{at}.function.description", "must be a string")
            normal["description"] = function["description"]
        if function.get("parameters") is not None:
            _check_parameters(function["parameters"], f"{at}.function.parameters", fail)
            normal["parameters"] = function["parameters"]
        if function.get("strict") is not None:
            if not isinstance(function["strict"], bool):
                fail(f"{at}.function.strict", "must be true or false")
            normal["strict"] = function["strict"]
        out.append({"type": "function", "function": normal})
    return out


def _check_parameters(schema, at: str, fail) -> None:
    """The shape OpenAI requires of a function's parameters: an object schema whose properties are schemas."""
    if not isinstance(schema, dict):
        fail(at, "must be a JSON Schema object")
    if schema.get("type", "object") != "object":
        fail(f"{at}.type", f"must be 'object' (the arguments are a JSON object), not {schema['type']!r}")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        fail(f"{at}.properties", "must be an object of schemas")
    for key, value in properties.items():
        if not isinstance(value, (dict, bool)):
            fail(f"{at}.properties.{key}", "must be a JSON Schema")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        fail(f"{at}.required", "must be a list of property names")


def _text_part(part, at: str, fail) -> str:
    if not isinstance(part, dict):
        fail(at, "must be an object with 'type'")
    if part.get("type") != "text":
        fail(f"{at}.type", f"only text parts are supported, not {part.get('type')!r}")
    if not isinstance(part.get("text"), str):
        fail(f"{at}.text", "must be a string")
    return part["text"]


def render(messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    return LEANSEEK_CHAT.render(messages, add_generation_prompt, tools)


def encode_chat(tokenizer: TextTokenizer, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and for each whether it is the assistant's (its think block,
    answer, tool calls and end-of-turn token: what SFT trains on; not the tool definitions nor the tool results).
    The turns are found by their control tokens, which only the template writes."""
    ids = LEANSEEK_CHAT.encode(tokenizer, messages, add_generation_prompt, tools)
    start, end = tokenizer.token_id(ASSISTANT), tokenizer.token_id(END_OF_TURN)
    mask, inside = [], False
    for t in ids:
        mask.append(inside)
        if t == start:
            inside = True
        elif t == end:
            inside = False
    return ids, mask


def read_chats(path: str | Path) -> list[list[dict] | dict]:
    """Conversations from a JSONL file, one {"messages": [...]} object per line, normalised; a line may give the
    conversation's tools too, {"messages": [...], "tools": [...]}, and comes back in that form (the messages list
    alone otherwise)."""
    path = Path(path)
    chats = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ChatError(f"{where}: expected an object with 'messages'")
            messages = validate(obj.get("messages"), where)
            tools = obj.get("tools")
            chats.append(messages if tools is None else {"messages": messages, "tools": validate_tools(tools, where)})
    if not chats:
        raise ChatError(f"{path}: no conversations")
    return chats


@dataclass
class ChatFormat:
    """How a model writes conversations: its chat template, the text of the token that ends an assistant turn,
    and what else the template reads (bos_token, eos_token). leanseek's own, or a Hugging Face model's."""

    template: str
    end: str
    context: dict = field(default_factory=dict)

    def __post_init__(self):
        env = _environment()
        self._compiled = env.from_string(self.template)
        self._reads_tools = "tools" in meta.find_undeclared_variables(env.parse(self.template))

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
               **template_kwargs) -> str:
        """The template's text; template_kwargs (e.g. DeepSeek-V3.1's `thinking`) reach the template as
        transformers' apply_chat_template passes its extra arguments."""
        return self._compiled.render({**self.context, **template_kwargs, "messages": messages, "tools": tools,
                                      "add_generation_prompt": add_generation_prompt})

    def encode(self, tokenizer: TextTokenizer, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None, **template_kwargs) -> list[int]:
        """The conversation's token ids, where only the template's markup gives control tokens: in every string of
        the messages (but their roles), the tools and the template kwargs, keys included, each control token's
        spelling is swapped for a placeholder the text cannot predict (a random nonce in private-use characters),
        the template renders, and the rendering is cut at the control tokens left (all the template's own); the
        text between them, placeholders restored, is encoded as text. With nothing to swap, the ids are exactly
        those of transformers' apply_chat_template. Tools, tool calls or tool results that the model cannot take
        (tools_error) raise ChatError."""
        if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            if (error := self.tools_error(tokenizer)) is not None:
                raise ChatError(error, "tools")
        spellings = list(tokenizer.control_tokens)
        number = {s: n for n, s in enumerate(spellings)}
        nonce = "".join(chr(0xE000 + secrets.randbelow(0x1900)) for _ in range(8))
        find = re.compile("|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True)))
        swapped = 0

        def swap(match: re.Match) -> str:
            nonlocal swapped
            swapped += 1
            return f"{nonce}{number[match.group()]}{nonce}"

        def escape(value):
            if isinstance(value, str):
                return find.sub(swap, value)
            if isinstance(value, dict):
                return {escape(k): escape(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [escape(v) for v in value]
            return value

        if spellings:
            messages = [{k: v if k == "role" else escape(v) for k, v in m.items()} for m in messages]
            tools, template_kwargs = escape(tools), escape(template_kwargs)
        rendered = self.render(messages, add_generation_prompt, tools, **template_kwargs)
        if not swapped:
            return tokenizer.encode_markup(rendered)
        placeholder = re.compile(f"{re.escape(nonce)}([0-9]+){re.escape(nonce)}")
        pieces = tokenizer.split_markup(rendered)
        texts = iter(tokenizer.encode_batch([placeholder.sub(lambda m: spellings[int(m.group(1))], p)
                                             for p in pieces if isinstance(p, str)]))
        return [i for p in pieces for i in ([p] if isinstance(p, int) else next(texts))]

    def tools_error(self, tokenizer: TextTokenizer) -> str | None:
        """Why this model cannot take tools (its tokenizer predates leanseek's tool tokens, or its template writes
        no tool definitions), or None when it can."""
        leanseek = all(tokenizer.token_id(t) is not None for t in BASE_TOKENS)
        if (leanseek or TOOL_CALL in self.template) and not tokenizer.supports_tools:
            return (f"this model's tokenizer was made before tool support (no {TOOL_CALL} token): tools need a "
                    "model trained from a tokenizer made by a newer `leanseek data`")
        if not self._reads_tools:
            return "this model's chat template does not write tool definitions, so the model cannot be given tools"
        return None


LEANSEEK_CHAT = ChatFormat(CHAT_TEMPLATE, END_OF_TURN)


def chat_format(folder: str | Path) -> ChatFormat:
    """The chat format of a checkpoint folder, from its tokenizer_config.json (or chat_template.jinja)."""
    folder = Path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        raise ChatError(f"{folder}: no chat template (tokenizer_config.json has no chat_template)")
    if template == CHAT_TEMPLATE:
        return LEANSEEK_CHAT

    def text(token):  # a special token is written as a string or as {"content": ...}
        return token.get("content") if isinstance(token, dict) else token

    bos, eos = text(config.get("bos_token")), text(config.get("eos_token"))
    context = {"bos_token": bos or "", "eos_token": eos}
    if eos == EOS and END_OF_TURN in map(text, config.get("additional_special_tokens") or []):
        return ChatFormat(template, END_OF_TURN, context)  # an earlier leanseek template: a reply ends its turn
    if not eos:
        raise ChatError(f"{folder}: tokenizer_config.json names no eos_token to end a reply")
    return ChatFormat(template, eos, context)
