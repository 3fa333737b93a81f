"""SFT data: conversations rendered with the chat template and packed into one token stream, with a flag per
token saying whether it is the assistant's (the only tokens the loss sees). Conversations follow each other, each
from its <|bos|>; training windows are cut from the stream as in pretraining. Every 20th conversation is held
out for validation."""

from __future__ import annotations

import random

import numpy as np

from ..data.chat import encode_chat, read_chats
from ..data.tokenizer import TextTokenizer

VAL_EVERY = 20


TASK_PROBLEMS = {"sums": 20000, "addition": 20000, "countdown": 4000}


def conversations(source: str, seed: int = 0) -> list[list[dict] | dict]:
    """`builtin` (leanseek.data.instructions), `task:NAME` (a task's training problems with worked reasoning;
    for sums, half answered at once), or an OpenAI messages JSONL file."""
    from ..data import instructions

    if source == "builtin":
        return instructions.builtin_chats(seed)
    if source.startswith("task:"):
        name = source.removeprefix("task:")
        rng = random.Random(seed)
        return instructions.task_chats(rng, name, TASK_PROBLEMS.get(name, 4000), seed,
                                       instructions.SUMS_THINK_RATE if name == "sums" else 1.0)
    return read_chats(source)


def pack(tokenizer: TextTokenizer, chats: list[list[dict] | dict]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, assistant flags) of the conversations one after another: messages lists, or {"messages", "tools"}
    for a conversation with tools (as read_chats gives them)."""
    ids, mask = [], []
    for chat in chats:
        messages, tools = (chat["messages"], chat["tools"]) if isinstance(chat, dict) else (chat, None)
        i, m = encode_chat(tokenizer, messages, tools=tools)
        ids += i
        mask += m
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    return np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=bool)


def sft_streams(tokenizer: TextTokenizer, source: str, seed: int = 0):
    """((train tokens, train flags), (validation tokens, validation flags))."""
    chats = conversations(source, seed)
    if len(chats) < 2:
        raise ValueError(f"{source}: SFT needs at least 2 conversations (one is held out for validation)")
    val = chats[::VAL_EVERY]
    train = [c for i, c in enumerate(chats) if i % VAL_EVERY]
    return pack(tokenizer, train), pack(tokenizer, val)
