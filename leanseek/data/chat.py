"""The chat format: system, user and assistant turns, the assistant's reasoning in <think>...</think> before its
answer. One Jinja template, saved in tokenizer_config.json as `chat_template`, so transformers'
`apply_chat_template` renders exactly what leanseek trains on:

    <|bos|><|system|>SYSTEM<|end|><|user|>QUESTION<|end|><|assistant|><think>REASONING</think>ANSWER<|end|>

Every assistant turn has a think block (empty when there is no reasoning), so a model always opens one; a
generation prompt ends with `<|assistant|>`. Conversations are OpenAI `messages` lists; assistant messages may
carry `reasoning_content`, as in DeepSeek's API.
"""

from __future__ import annotations

import json
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
    """A conversation that is not a valid messages list; the message names where."""


def validate(messages, where: str = "conversation") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatError(f"{where}: message {i}: 'role' must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"{where}: message {i}: 'content' must be a string")
        r = m.get("reasoning_content")
        if r is not None and (m["role"] != "assistant" or not isinstance(r, str)):
            raise ChatError(f"{where}: message {i}: 'reasoning_content' must be a string on an assistant message")
    return messages


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return LEANSEEK_CHAT.render(messages, add_generation_prompt)


def encode_chat(tokenizer: TextTokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and for each whether it is the assistant's (its think block,
    answer and end-of-turn token: what SFT trains on)."""
    ids = tokenizer.encode(render(messages, add_generation_prompt))
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
