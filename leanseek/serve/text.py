"""A completion's text as its tokens arrive: the reasoning (inside <think>) apart from the answer, cut at stop
strings, for the server's streams and the terminal chat; and each token's bytes and text as log-probabilities
show them."""

from __future__ import annotations

from tokenizers import decoders

from ..data.tokenizer import END_OF_TURN, END_THINK, THINK


class TextStream:
    """A completion's tokens as they arrive, split into reasoning (inside <think>) and answer text, cut at a stop
    string; text that may still turn into a stop string, or an incomplete UTF-8 character, is held back."""

    def __init__(self, tokenizer, stop: list[str], chat: bool, end: str = END_OF_TURN, prefix: str = ""):
        """end: the text of the token that ends the reply; prefix: text the prompt already opened the reply with
        (a template whose generation prompt ends in <think>)."""
        self.tokenizer, self.stop, self.chat, self.end, self.prefix = tokenizer, stop, chat, end, prefix
        self.ids: list[int] = []
        self.sent = ["", ""]

    def parts(self, final: bool = False) -> tuple[str, str]:
        text = (self.prefix + self.tokenizer.decode(self.ids)).split(self.end)[0]
        reasoning, content = "", text
        if self.chat and text.startswith(THINK):
            reasoning, _, content = text[len(THINK):].partition(END_THINK)
            if END_THINK not in text:
                reasoning, content = text[len(THINK):], ""
        for s in self.stop:
            content = content.split(s)[0]
        if not final:
            content = content.rstrip("\ufffd")
            reasoning = reasoning.rstrip("\ufffd")
            held = max((k for s in self.stop for k in range(1, len(s)) if content.endswith(s[:k])), default=0)
            content = content[: len(content) - held]
        return reasoning, content

    def feed(self, tokens: list[int], final: bool = False) -> tuple[str, str]:
        """The new (reasoning, answer) text since the last call."""
        self.ids += tokens
        parts = self.parts(final)
        delta = tuple(p[len(s):] if p.startswith(s) else "" for p, s in zip(parts, self.sent))
        self.sent = [p if p.startswith(s) else s for p, s in zip(parts, self.sent)]
        return delta


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable bytes stand for themselves, the others for the characters from U+0100
    on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class TokenPieces:
    """Each token's bytes and its text as OpenAI's logprobs show it: the text, or `bytes:\\xNN...` for a piece
    of a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        tk = getattr(tokenizer, "tk", None)
        byte_level = tk is not None and isinstance(tk.decoder, decoders.ByteLevel)
        self._alphabet = _byte_of_char() if byte_level else None
        self._added = {i: t.content for i, t in tk.get_added_tokens_decoder().items()} if tk is not None else {}
        self._cache: dict[int, tuple[bytes, str]] = {}

    def _piece(self, token: int) -> tuple[bytes, str]:
        if token not in self._cache:
            piece = self.tokenizer.tk.id_to_token(token) if self._alphabet is not None else None
            if token in self._added:
                raw = self._added[token].encode()
            elif piece is not None and all(c in self._alphabet for c in piece):
                raw = bytes(self._alphabet[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token]).encode()
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._cache[token] = raw, text
        return self._cache[token]

    def bytes(self, token: int) -> bytes:
        return self._piece(token)[0]

    def text(self, token: int) -> str:
        return self._piece(token)[1]

    def chars(self, tokens: list[int]) -> int:
        """The characters the tokens' joined text has: one starts at every byte that is not a UTF-8
        continuation byte."""
        return sum((b & 0xC0) != 0x80 for t in tokens for b in self.bytes(t))

    def offsets(self, tokens: list[int], start: int = 0) -> list[int]:
        """The character offset at which each token starts in their joined text, counted from `start`."""
        out = []
        for t in tokens:
            out.append(start)
            start += self.chars([t])
        return out
