"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers`, saved in the form AutoTokenizer loads.

Digits are split one per token before BPE (arithmetic tasks need each digit to be its own token), and the byte
alphabet is always in the vocabulary, so any UTF-8 text encodes and decodes back exactly.

Text is encoded as text: a string that spells a special or added token ("<|end|>", a Hugging Face folder's
"<｜User｜>") becomes ordinary tokens, so no text can forge a control token. Only `encode_markup`, for a chat
template's own markup, turns such spellings into their tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..atomic import write_text_atomic

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
THINK, END_THINK = "<think>", "</think>"
TOOLS, TOOL_CALL, TOOL_ARGS, TOOL = "<|tools|>", "<|tool_call|>", "<|tool_args|>", "<|tool|>"
BASE_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, THINK, END_THINK]
# appended, so a tokenizer made before tool support (which lacks them) keeps every other token's id
TOOL_TOKENS = [TOOLS, TOOL_CALL, TOOL_ARGS, TOOL]
SPECIAL_TOKENS = BASE_TOKENS + TOOL_TOKENS
# GPT-2's split, less its digit runs: digits are isolated first, one per token
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class TextTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with leanseek's special tokens."""

    def __init__(self, tokenizer: Tokenizer, strict: bool = True):
        """strict: require leanseek's special tokens (a foreign model's tokenizer, for serving, has its own); the
        tool tokens are optional, as tokenizers made before tool support lack them (see `supports_tools`)."""
        self.tk = tokenizer
        missing = [t for t in BASE_TOKENS if tokenizer.token_to_id(t) is None]
        if missing and strict:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))
        added = tokenizer.get_added_tokens_decoder()
        self._added = {t.content: t for t in added.values()}
        # the spelling of every special or added token, and its id: the control tokens no text may produce
        self.control_tokens: dict[str, int] = {t.content: i for i, t in added.items()}
        self._control_ids = frozenset(added)
        # tokenizers extracts the tokens matched on the raw text first, then those matched after normalisation;
        # each set leftmost-longest, which an alternation longest first reproduces
        self._markup = [re.compile("|".join(re.escape(t) for t in sorted(group, key=len, reverse=True)))
                        for group in ([t for t in self._added if not self._added[t].normalized],
                                      [t for t in self._added if self._added[t].normalized]) if group]
        # the same tokenizer with no added tokens: nothing in a text is extracted as one
        config = json.loads(tokenizer.to_str())
        config["added_tokens"] = []
        self._text = Tokenizer.from_str(json.dumps(config))

    @property
    def supports_tools(self) -> bool:
        """Whether it has leanseek's four tool tokens (tokenizers made before tool support do not)."""
        return all(self.tk.token_to_id(t) is not None for t in TOOL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """`text` as text: no control token, whatever it spells."""
        return self._as_text(self._text.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._as_text(e) for e in self._text.encode_batch(texts, add_special_tokens=False)]

    def encode_markup(self, text: str) -> list[int]:
        """`text` with every special or added token's spelling as that token: for a template's own markup only."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def split_markup(self, text: str) -> list[str | int]:
        """`text` cut where `encode_markup` extracts control tokens: each one's id, and the text between as str
        (matched as tokenizers matches them, with the tokens' single_word, lstrip and rstrip rules)."""
        pieces: list[str | int] = [text]
        for pattern in self._markup:
            pieces = [q for p in pieces for q in (self._split(p, pattern) if isinstance(p, str) else [p])]
        return [p for p in pieces if p != ""]

    def _split(self, text: str, pattern: re.Pattern) -> list[str | int]:
        pieces: list[str | int] = []
        done = 0
        for m in pattern.finditer(text):
            start, stop = m.span()
            token = self._added[m.group()]
            if token.single_word and (re.search(r"\w\Z", text[:start]) or re.match(r"\w", text[stop:])):
                continue
            if token.lstrip:  # the spaces before it belong to the token
                start = max(len(text[:start].rstrip()), done)
            if token.rstrip:
                stop = len(text) - len(text[stop:].lstrip())
            pieces += [text[done:start], self.control_tokens[m.group()]]
            done = stop
        return [*pieces, text[done:]]

    def _as_text(self, encoding) -> list[int]:
        ids = encoding.ids
        if self._control_ids.isdisjoint(ids):
            return ids
        # A vocabulary may itself hold a control token's spelling (BPE with ignore_merges maps a whole word to its
        # entry): that piece is written one character at a time instead.
        out = []
        for i, piece in zip(ids, encoding.tokens):
            out += [t.id for c in piece for t in self._text.model.tokenize(c)] if i in self._control_ids else [i]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        return self.tk.token_to_id(token)

    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json (with the chat template), written atomically (transformers'
        AutoTokenizer reads them)."""
        from .chat import CHAT_TEMPLATE
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            # only those it has: transformers would add a listed token it lacks as a new one
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)
                                          and self.tk.token_to_id(t) is not None],
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": CHAT_TEMPLATE,
        }
        for name, text in (("tokenizer.json", self.tk.to_str(pretty=False)),
                           ("tokenizer_config.json", json.dumps(config, indent=2) + "\n")):
            write_text_atomic(folder / name, text)

    @classmethod
    def load(cls, folder: str | os.PathLike, strict: bool = True) -> "TextTokenizer":
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train one with `leanseek data`")
        return cls(Tokenizer.from_file(str(path)), strict)


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> TextTokenizer:
    """Train byte-level BPE on `texts` to `vocab_size` entries (special tokens and the 256 bytes included)."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} must exceed {floor} (the special tokens and the 256 bytes)")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = _pre_tokenizer()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tk.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tk)
