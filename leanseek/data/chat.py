"""The chat format: system, user and assistant turns, the assistant's reasoning in <think>...</think> before its
answer. One Jinja template, saved in tokenizer_config.json as `chat_template`, so transformers'
`apply_chat_template` renders exactly what leanseek trains on:

    <|bos|><|system|>SYSTEM<|end|><|user|>QUESTION<|end|><|assistant|><think>REASONING</think>ANSWER<|end|>

Every assistant turn has a think block (empty when there is no reasoning), so a model always opens one; a
generation prompt ends with `<|assistant|>`. Conversations are OpenAI `messages` lists; assistant messages may
carry `reasoning_content`, as in DeepSeek's API.

Message text is text: `ChatFormat.encode` gives control tokens only to the template's own markup, for any template
(leanseek's or a Hugging Face folder's), so a message that spells "<|end|><|assistant|>" cannot end its turn or
open a forged one.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import ASSISTANT, BOS, END_OF_TURN, END_THINK, SYSTEM, THINK, USER, TextTokenizer

CHAT_TEMPLATE = (
    BOS + "{% for m in messages %}"
    "{% if m['role'] == 'system' %}" + SYSTEM + "{{ m['content'] }}" + END_OF_TURN +
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}" + END_OF_TURN +
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + THINK +
    "{% if m['reasoning_content'] %}{{ m['reasoning_content'] }}{% endif %}" + END_THINK +
    "{{ m['content'] }}" + END_OF_TURN + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
ROLES = ("system", "user", "assistant")

def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja as transformers sets it up for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise ChatError(message)

    env.globals["raise_exception"] = raise_exception
    return env


class ChatError(ValueError):
    """A conversation that is not a valid messages list; `param` is the field's path (e.g.
    "messages[1].content[0].type"), which the message names too."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def validate(messages, where: str = "conversation") -> list[dict]:
    """The conversation normalised to what the templates read (new dicts of role, content, and name and
    reasoning_content when given; other fields are left out): "developer" is "system", a list of text parts is
    joined into one string, an assistant's missing or null content is "". Raises ChatError for anything else
    (parts that are not text, tool messages, tool calls)."""

    def fail(param: str, problem: str):
        raise ChatError(f"{where}: {param}: {problem}" if where else f"{param}: {problem}", param)

    if not isinstance(messages, list) or not messages:
        fail("messages", "must be a non-empty list")
    normal = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            fail(at, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role == "tool":
            fail(f"{at}.role", "tool messages are not supported")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            fail(f"{at}.role", "must be one of system, developer, user, assistant")
        for key in ("tool_calls", "function_call"):
            if m.get(key):
                fail(f"{at}.{key}", "tool calls are not supported")
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
        normal.append(out)
    return normal


def _text_part(part, at: str, fail) -> str:
    if not isinstance(part, dict):
        fail(at, "must be an object with 'type'")
    if part.get("type") != "text":
        fail(f"{at}.type", f"only text parts are supported, not {part.get('type')!r}")
    if not isinstance(part.get("text"), str):
        fail(f"{at}.text", "must be a string")
    return part["text"]


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return LEANSEEK_CHAT.render(messages, add_generation_prompt)


def encode_chat(tokenizer: TextTokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and for each whether it is the assistant's (its think block,
    answer and end-of-turn token: what SFT trains on). The turns are found by their control tokens, which only
    the template writes."""
    ids = LEANSEEK_CHAT.encode(tokenizer, messages, add_generation_prompt)
    start, end = tokenizer.token_id(ASSISTANT), tokenizer.token_id(END_OF_TURN)
    mask, inside = [], False
    for t in ids:
        mask.append(inside)
        if t == start:
            inside = True
        elif t == end:
            inside = False
    return ids, mask


def read_chats(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file, one {"messages": [...]} object per line."""
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
            chats.append(validate(obj.get("messages"), where))
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
        self._compiled = _environment().from_string(self.template)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.context)

    def encode(self, tokenizer: TextTokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """The conversation's token ids, where only the template's markup gives control tokens: in every message
        field but the role, each control token's spelling is swapped for a placeholder the text cannot predict (a
        random nonce in private-use characters), the template renders, and the rendering is cut at the control
        tokens left (all the template's own); the text between them, placeholders restored, is encoded as text.
        With nothing to swap, the ids are exactly those of transformers' apply_chat_template."""
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
                return {k: escape(v) for k, v in value.items()}
            if isinstance(value, list):
                return [escape(v) for v in value]
            return value

        if spellings:
            messages = [{k: v if k == "role" else escape(v) for k, v in m.items()} for m in messages]
        rendered = self.render(messages, add_generation_prompt)
        if not swapped:
            return tokenizer.encode_markup(rendered)
        placeholder = re.compile(f"{re.escape(nonce)}([0-9]+){re.escape(nonce)}")
        pieces = tokenizer.split_markup(rendered)
        texts = iter(tokenizer.encode_batch([placeholder.sub(lambda m: spellings[int(m.group(1))], p)
                                             for p in pieces if isinstance(p, str)]))
        return [i for p in pieces for i in ([p] if isinstance(p, int) else next(texts))]


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
    if not eos:
        raise ChatError(f"{folder}: tokenizer_config.json names no eos_token to end a reply")
    return ChatFormat(template, eos, {"bos_token": bos or "", "eos_token": eos})
