"""`leanseek chat RUN_DIR`: talk to a model in the terminal. Replies stream as they are generated, the reasoning
dimmed before the answer. End a line with a backslash to continue on the next; /reset starts over,
/temperature T sets the sampling temperature, /think on|off lets the model reason or makes it answer at once,
/help lists them; Ctrl-C stops a reply (or, at the prompt, leaves), as does Ctrl-D."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from ..data.chat import encode_chat
from ..data.tokenizer import END_OF_TURN, END_THINK, THINK, TextTokenizer
from ..device import add_device_arguments, inference_dtype, use_device
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..train.checkpoint import checkpoint_of
from .text import TextStream

DIM, RESET = "\033[2m", "\033[0m"
HELP = ("/reset: a new conversation   /temperature T: sampling temperature (0: greedy)   "
        "/think on|off: reasoning or a direct answer   /help   Ctrl-D: quit")


class TerminalChat:
    def __init__(self, engine: Engine, tokenizer, temperature: float = 0.7, max_new_tokens: int = 512,
                 out=sys.stdout, color: bool | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.temperature, self.max_new_tokens, self.think = temperature, max_new_tokens, True
        self.out = out
        self.color = out.isatty() if color is None else color
        self.messages: list[dict] = []

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        if name == "/reset":
            self.messages = []
            self.say("(new conversation)")
        elif name == "/temperature":
            try:
                value = float(arg)
                if value < 0:
                    raise ValueError
                self.temperature = value
                self.say(f"(temperature {value})")
            except ValueError:
                self.say(f"(/temperature needs a number >= 0, not {arg!r})")
        elif name == "/think" and arg in ("on", "off"):
            self.think = arg == "on"
            self.say(f"(thinking {arg})")
        else:
            self.say(HELP)

    def reply(self, text: str) -> None:
        """Send a user message and stream the answer; Ctrl-C stops it (what came so far is kept)."""
        self.messages.append({"role": "user", "content": text})
        prompt = encode_chat(self.tokenizer, self.messages, add_generation_prompt=True)[0]
        forced = [] if self.think else self.tokenizer.encode_markup(THINK + END_THINK)
        stream = TextStream(self.tokenizer, [], chat=True)
        if forced:
            stream.feed(forced)
        budget = self.engine.max_len - len(prompt) - len(forced)
        if budget < 1:
            self.messages.pop()
            self.say("(the conversation fills the context: /reset)")
            return
        shown_reasoning = False
        try:
            for token in self.engine.stream(prompt + forced, max_new_tokens=min(self.max_new_tokens, budget),
                                            temperature=self.temperature,
                                            stop=[self.tokenizer.token_id(END_OF_TURN)]):
                reasoning, content = stream.feed([token])
                if reasoning:
                    self.write((DIM if self.color else "") + reasoning + (RESET if self.color else ""))
                    shown_reasoning = True
                if content:
                    if shown_reasoning:
                        self.write("\n")
                        shown_reasoning = False
                    self.write(content)
        except KeyboardInterrupt:
            self.write(" (stopped)")
        self.write("\n")
        self.messages.append({"role": "assistant", "content": stream.parts(final=True)[1]})

    def say(self, text: str) -> None:
        self.write(text + "\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def run(self, read=input) -> None:
        self.say(f"leanseek chat. {HELP}")
        while True:
            try:
                lines = [read("> ")]
                while lines[-1].endswith("\\"):
                    lines[-1] = lines[-1][:-1]
                    lines.append(read(". "))
            except (EOFError, KeyboardInterrupt):
                self.write("\n")
                return
            text = "\n".join(lines).strip()
            if not text:
                continue
            if text.startswith("/"):
                self.command(text)
            else:
                self.reply(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder or checkpoint")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-len", type=int, default=1024, help="tokens of the whole conversation")
    add_device_arguments(p)


def run(args) -> None:
    device = use_device(args)
    path = checkpoint_of(Path(args.model))
    model, tokenizer = load_hf(path, dtype=inference_dtype(device), device=device), TextTokenizer.load(path)
    engine = Engine(model, tokenizer, max_batch=1, max_len=args.max_len)
    TerminalChat(engine, tokenizer, temperature=args.temperature, max_new_tokens=args.max_new_tokens).run()
