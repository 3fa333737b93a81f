"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers`, saved in the form AutoTokenizer loads.

Digits are split one per token before BPE (arithmetic tasks need each digit to be its own token), and the byte
alphabet is always in the vocabulary, so any UTF-8 text encodes and decodes back exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..atomic import write_text_atomic

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, THINK, END_THINK]
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
        """strict: require leanseek's special tokens (a foreign model's tokenizer, for serving, has its own)."""
        self.tk = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing and strict:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

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
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
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
