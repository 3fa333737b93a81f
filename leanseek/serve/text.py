"""A completion's text as its tokens arrive: the reasoning (inside <think>) apart from the answer, cut at stop
strings, for the server's streams and the terminal chat."""

from __future__ import annotations

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
