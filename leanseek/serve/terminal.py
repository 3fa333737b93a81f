"""`leanseek chat RUN_DIR`: talk to a model in the terminal. Replies stream as they are generated, the reasoning
dimmed before the answer. The model is offered the built-in tools (leanseek.tools) when its tokenizer has the tool
tokens: when a reply calls them, the chat runs them, shows each call and its result (dimmed), and lets the model
continue, for up to MAX_TOOL_ROUNDS rounds of calls a turn. End a line with a backslash to continue on the next;
/reset starts over, /temperature T sets the sampling temperature, /think on|off lets the model reason or makes it
answer at once, /tools on|off offers the tools or not, /help lists them; Ctrl-C stops a reply (or, at the prompt,
leaves), as does Ctrl-D."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from ..data.chat import LEANSEEK_CHAT, encode_chat
from ..data.tokenizer import END_OF_TURN, END_THINK, THINK, TextTokenizer
from ..device import (add_compile_argument, add_device_arguments, add_prefix_cache_argument, add_quantize_argument,
                      inference_dtype, quantize_mode, use_device, wants_compile)
from ..infer.engine import Engine
from ..model.hf import load_hf
from ..tools import MAX_TOOL_ROUNDS, assistant_message, tool_definitions, tool_results
from ..train.checkpoint import checkpoint_of
from .text import TextStream
from .toolcalls import tool_parser

DIM, RESET = "\033[2m", "\033[0m"
HELP = ("/reset: a new conversation   /temperature T: sampling temperature (0: greedy)   "
        "/think on|off: reasoning or a direct answer   /tools on|off: offer the built-in tools   /help   "
        "Ctrl-D: quit")


class TerminalChat:
    def __init__(self, engine: Engine, tokenizer, temperature: float = 0.7, max_new_tokens: int = 512,
                 out=sys.stdout, color: bool | None = None, tools: bool = False):
        """tools: offer the built-in tools (when the tokenizer can: see ChatFormat.tools_error)."""
        self.engine, self.tokenizer = engine, tokenizer
        self.temperature, self.max_new_tokens, self.think = temperature, max_new_tokens, True
        self.out = out
        self.color = out.isatty() if color is None else color
        self.messages: list[dict] = []
        self.tools_error = LEANSEEK_CHAT.tools_error(tokenizer)
        self.tools = tools and self.tools_error is None

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
        elif name == "/tools" and arg in ("on", "off"):
            if arg == "on" and self.tools_error:
                self.say(f"({self.tools_error})")
            else:
                self.tools = arg == "on"
                self.say(f"(tools {arg})")
        else:
            self.say(HELP)

    def reply(self, text: str) -> None:
        """Send a user message and stream the answer, running the tools it calls and letting the model go on;
        Ctrl-C stops it (what came so far is kept)."""
        self.messages.append({"role": "user", "content": text})
        for round in range(MAX_TOOL_ROUNDS + 1):
            message = self.generate(first=round == 0)
            if message is None:
                return
            self.messages.append(message)
            if "tool_calls" not in message:
                return
            if round == MAX_TOOL_ROUNDS:
                self.say(f"(stopped after {MAX_TOOL_ROUNDS} rounds of tool calls)")
                return
            for call, result in zip(message["tool_calls"], tool_results(message)):
                function = call["function"]
                self.dim(f"[{function['name']}({function['arguments']})]\n{result['content']}\n")
                self.messages.append(result)

    def generate(self, first: bool) -> dict | None:
        """One assistant message, streamed: its reasoning dimmed, its content, its tool calls parsed (when tools
        are on). None when the conversation fills the context."""
        tools = tool_definitions() if self.tools else None
        prompt = encode_chat(self.tokenizer, self.messages, add_generation_prompt=True, tools=tools)[0]
        forced = [] if self.think else self.tokenizer.encode_markup(THINK + END_THINK)
        stream = TextStream(self.tokenizer, [], chat=True)
        if forced:
            stream.feed(forced)
        parser = tool_parser(LEANSEEK_CHAT)() if tools else None
        budget = self.engine.max_len - len(prompt) - len(forced)
        if budget < 1:
            if first:
                self.messages.pop()
            self.say("(the conversation fills the context: /reset)")
            return None
        said, shown_reasoning, stopped = [], False, False  # said: the content shown, without call markup

        def show(content: str, final: bool = False) -> None:
            nonlocal shown_reasoning
            if parser:
                content = parser.feed(content)[0] + (parser.finish()[0] if final else "")
            if content:
                if shown_reasoning:
                    self.write("\n")
                    shown_reasoning = False
                self.write(content)
                said.append(content)

        try:
            for token in self.engine.stream(prompt + forced, max_new_tokens=min(self.max_new_tokens, budget),
                                            temperature=self.temperature,
                                            stop=[self.tokenizer.token_id(END_OF_TURN)]):
                reasoning, content = stream.feed([token])
                if reasoning:
                    self.dim(reasoning)
                    shown_reasoning = True
                show(content)
        except KeyboardInterrupt:
            stopped = True
        show(stream.feed([], final=True)[1], final=True)
        if stopped:
            self.write(" (stopped)")
        self.write("\n")
        calls = parser.calls if parser and not stopped else []  # a stopped reply's calls are not run
        return assistant_message(stream.parts(final=True)[0], "".join(said), calls)

    def dim(self, text: str) -> None:
        self.write((DIM if self.color else "") + text + (RESET if self.color else ""))

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
    p.add_argument("--no-tools", action="store_true", help="do not offer the built-in tools (/tools on|off)")
    add_device_arguments(p)
    add_compile_argument(p)
    add_prefix_cache_argument(p)
    add_quantize_argument(p)


def run(args) -> None:
    device = use_device(args)
    path = checkpoint_of(Path(args.model))
    model = load_hf(path, dtype=inference_dtype(device), device=device, quantize=quantize_mode(args, device))
    tokenizer = TextTokenizer.load(path)
    engine = Engine(model, tokenizer, max_batch=1, max_len=args.max_len,
                    compile=wants_compile(args, device, model.cfg.v4), prefix_cache=args.prefix_cache)
    engine.warm_up()
    TerminalChat(engine, tokenizer, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                 tools=not args.no_tools).run()
