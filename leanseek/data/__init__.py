"""Data: the tokenizer, text sources (the built-in corpus included), and tokenized shards."""

from .shards import load_split, write_shards
from .sources import DataError, collect
from .tokenizer import TextTokenizer, train_tokenizer

__all__ = ["DataError", "TextTokenizer", "collect", "load_split", "train_tokenizer", "write_shards"]
