"""SFT data: conversations rendered with the chat template and packed into one token stream, with a flag per
token saying whether it is the assistant's (the only tokens the loss sees). Every 20th conversation is held out for
validation.

Training windows are cut from the stream as in pretraining (every seq_len tokens), so the stream is laid out for
them: each conversation lies whole inside one window (first fit into the windows still open, the rest of a window
padded and not learned). A conversation cut at a window's edge would train its answer without the question or the
tool result it answers from, which teaches a small model to make answers up (measured: with cut conversations, a
speedrun model never learned to copy a looked-up definition, words in its calls included). Only a conversation
longer than a window is split, from a window's start."""

from __future__ import annotations

import random
from collections import deque

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


OPEN_WINDOWS = 64  # how many part-filled windows a conversation may go to (first fit): bounds the packing's time


def pack(tokenizer: TextTokenizer, chats: list[list[dict] | dict],
         seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, assistant flags) of the conversations: messages lists, or {"messages", "tools"} for a conversation
    with tools (as read_chats gives them). Without seq_len, one after another; with it, laid out for windows of
    seq_len tokens (see above), padded with <|pad|> tokens that are not learned."""
    encoded = []
    for chat in chats:
        messages, tools = (chat["messages"], chat["tools"]) if isinstance(chat, dict) else (chat, None)
        encoded.append(encode_chat(tokenizer, messages, tools=tools))
    if seq_len is not None:
        encoded = windowed(encoded, seq_len, tokenizer.pad_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    return (np.asarray([i for ids, _ in encoded for i in ids], dtype=dtype),
            np.asarray([m for _, mask in encoded for m in mask], dtype=bool))


def windowed(encoded: list[tuple[list[int], list[bool]]], seq_len: int,
             pad_id: int) -> list[tuple[list[int], list[bool]]]:
    """The (ids, flags) pieces regrouped so that each piece lies inside one window of seq_len tokens: a piece goes
    to the first of the last OPEN_WINDOWS windows it fits in, or starts a new window; a piece longer than a window
    starts a window of its own and runs on; every window but the last is padded to seq_len."""
    windows: list[tuple[list[int], list[bool]]] = []
    recent = deque(maxlen=OPEN_WINDOWS)  # indices of the newest windows, the ones a piece may join
    for ids, mask in encoded:
        if len(ids) > seq_len:
            windows += [(ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
            recent.append(len(windows) - 1)
            continue
        home = next((w for w in recent if len(windows[w][0]) + len(ids) <= seq_len), None)
        if home is None:
            windows.append(([], []))
            home = len(windows) - 1
            recent.append(home)
        windows[home][0].extend(ids)
        windows[home][1].extend(mask)
    for ids, mask in windows[:-1]:
        ids.extend([pad_id] * (seq_len - len(ids)))
        mask.extend([False] * (seq_len - len(mask)))
    return windows


def sft_streams(tokenizer: TextTokenizer, source: str, seed: int = 0, seq_len: int | None = None):
    """((train tokens, train flags), (validation tokens, validation flags)), laid out for windows of seq_len."""
    chats = conversations(source, seed)
    if len(chats) < 2:
        raise ValueError(f"{source}: SFT needs at least 2 conversations (one is held out for validation)")
    val = chats[::VAL_EVERY]
    train = [c for i, c in enumerate(chats) if i % VAL_EVERY]
    return pack(tokenizer, train, seq_len), pack(tokenizer, val, seq_len)
