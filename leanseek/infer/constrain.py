"""Constrained decoding: grammars that decide, token by token, what a request may generate (JSON that validates
against a schema, leanseek's tool calls), and the masks the engine's sampler applies.

    grammar = Grammar.json(tokenizer, {"type": "object", "properties": {...}, "required": [...]})
    engine.submit(prompt, constraint=grammar, max_new_tokens=256)   # the output parses and validates

A Grammar is compiled once and shared; each request gets its own Matcher (grammar.matcher()), which the engine
advances with every token it commits. Before each token is chosen, the tokens the grammar does not allow next get
-inf logits, so greedy and sampled decoding alike can only produce text the grammar accepts. Special tokens (every
added token of the tokenizer: leanseek's <|end|>, <|tool_call|>, a DeepSeek folder's <｜User｜>...) are only allowed
where a grammar names them, never inside text, so a constrained reply cannot forge a turn.

The library is llguidance (Microsoft's; Rust, CPU), chosen over xgrammar by benchmarks/grammar_mask.py: one
JSON-schema grammar, per token the masks of the whole batch, applied to the logits, and every matcher advanced
(2-core AMD EPYC, 2 threads, leanseek BPE tokenizers, against the tiny model's eager decode step):

    vocabulary  batch   llguidance         xgrammar           decode step
    4,096       1       0.07 ms (1.8%)     0.15 ms (3.5%)     4.2 ms
    4,096       16      0.30 ms (4.3%)     0.50 ms (7.3%)     6.8 ms
    32,768      1       0.13 ms (1.6%)     0.26 ms (3.2%)     8.2 ms
    32,768      16      0.95 ms (6.9%)     3.2 ms (23%)       13.8 ms

Compiling the schema took 2 ms against 3-10 ms. llguidance also has no dependencies (xgrammar pulls triton,
transformers and tvm-ffi), and its Lark grammars name special tokens and embed JSON schemas, which the reply
grammar below is written in.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections.abc import Iterable

import llguidance
import torch

from ..data.tokenizer import END_OF_TURN, END_THINK, EOS, THINK, TOOL_ARGS, TOOL_CALL, TextTokenizer

# JSON is generated compact (',' and ':' with no spaces around them): flexible whitespace would let a model pad
# a reply with blanks up to its token budget
_JSON_OPTIONS = {"whitespace_flexible": False}
# leanseek's, then DeepSeek's and other Hugging Face tokenizers' end-of-sequence tokens
_ENDS = (EOS, END_OF_TURN, "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>")
_TEXT = r"/(?s:.)*/"  # any text; it cannot hold a special token, which only a grammar's <[id]> allows


class GrammarError(ValueError):
    """A schema or grammar the library cannot compile, or a tokenizer that lacks a token the grammar needs."""


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _vocabulary(tokenizer: TextTokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer (built once per tokenizer): every added token is special, as
    TextTokenizer treats them all as control tokens."""
    with _lock:
        vocab = _vocabularies.get(tokenizer)
        if vocab is None:
            config = json.loads(tokenizer.tk.to_str())
            for t in config.get("added_tokens", []):
                t["special"] = True
            # the token a grammar that is complete but may go on (bare text, a number) can end with
            ends = [t for t in _ENDS if t in tokenizer.control_tokens] or list(tokenizer.control_tokens)
            if not ends:
                raise GrammarError("the tokenizer has no special token to end a constrained output with")
            eos = tokenizer.control_tokens[ends[0]]
            vocab = _vocabularies[tokenizer] = llguidance.LLTokenizer(json.dumps(config), eos_token=eos)
        return vocab


def _special(tokenizer: TextTokenizer, spelling: str) -> str:
    """The Lark reference to a special token."""
    i = tokenizer.token_id(spelling)
    if i is None or i not in tokenizer.control_tokens.values():
        raise GrammarError(f"the tokenizer has no {spelling} token")
    return f"<[{i}]>"


def _json_rule(schema: dict | None) -> str:
    """A Lark right-hand side for JSON validating against schema (None: any JSON object)."""
    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


class Grammar:
    """A compiled grammar over one tokenizer's tokens; thread-safe to start matchers from."""

    def __init__(self, tokenizer: TextTokenizer, lark: str):
        self.tokenizer, self.source = tokenizer, lark
        vocab = _vocabulary(tokenizer)
        self._prototype = llguidance.LLMatcher(vocab, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if self._prototype.is_error():  # its first line says what is wrong (after where); the rest quotes the grammar
            first = self._prototype.get_error().strip().splitlines()[0]
            raise GrammarError(re.sub(r"^(at )?\d+\(\d+\): ", "", first))
        self._words = (vocab.vocab_size + 31) // 32  # the mask's size, in 32-bit words
        self._lock = threading.Lock()

    @classmethod
    def json(cls, tokenizer: TextTokenizer, schema: dict | None = None) -> "Grammar":
        """JSON text validating against a JSON Schema (None: any JSON object), and nothing after it."""
        return _compiled(tokenizer, f"start: {_json_rule(schema)}\n")

    @classmethod
    def lark(cls, tokenizer: TextTokenizer, grammar: str) -> "Grammar":
        """A grammar in llguidance's Lark dialect (special tokens as <[id]>, JSON schemas as %json {...})."""
        return _compiled(tokenizer, grammar)

    @classmethod
    def text(cls, tokenizer: TextTokenizer, end: str | None = None) -> "Grammar":
        """Any text (no special token), then the `end` token when given."""
        return _compiled(tokenizer, f"start: TEXT{' ' + _special(tokenizer, end) if end else ''}\nTEXT: {_TEXT}\n")

    def matcher(self) -> "Matcher":
        with self._lock:
            return Matcher(self._prototype.deep_copy(), self._words)


@functools.lru_cache(maxsize=64)
def _compiled(tokenizer: TextTokenizer, lark: str) -> Grammar:
    """Grammars by source: requests that repeat a schema or a set of tools reuse its compilation (which takes
    tens of milliseconds for a large vocabulary)."""
    return Grammar(tokenizer, lark)


class Matcher:
    """Where one request is in a grammar."""

    def __init__(self, state: llguidance.LLMatcher, words: int):
        self._state, self._words = state, words

    def advance(self, token: int) -> None:
        """Consume a committed token; raises ValueError if the grammar does not allow it."""
        if not self._state.consume_token(token):
            raise ValueError(f"the constraint does not allow token {token}: {self._state.get_error()}")

    def allows(self, token: int) -> bool:
        return self._state.validate_tokens([token]) == 1

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the request ends here."""
        return self._state.is_stopped()

    @property
    def accepting(self) -> bool:
        """What was generated so far is complete (more may still follow)."""
        return self._state.is_accepting()


_executor: llguidance.LLExecutor | None = None


def allowed_tokens(matchers: list[Matcher], vocab_size: int) -> torch.Tensor:
    """What each matcher allows next, as a bool mask [len(matchers), vocab_size] (ids past the tokenizer's
    vocabulary, a model's padding, are never allowed). The masks are computed in parallel."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor(max(1, torch.get_num_threads()))
    words = matchers[0]._words
    if any(m._words != words for m in matchers):
        raise ValueError("the constraints of one batch must share a tokenizer")
    bits = torch.zeros(len(matchers), words, dtype=torch.int32)
    _executor.unsafe_compute_mask_ptr([(m._state, i) for i, m in enumerate(matchers)], bits.data_ptr(),
                                      words * 4, len(matchers))
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().view(len(matchers), -1)[:, :vocab_size]
    if allowed.shape[1] < vocab_size:
        allowed = torch.cat([allowed, allowed.new_zeros(len(matchers), vocab_size - allowed.shape[1])], 1)
    return allowed


def mask_logits(logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> torch.Tensor:
    """logits [B, V] with -inf for what matchers[i] does not allow in row rows[i] (a copy; other rows as they
    were)."""
    allowed = torch.ones(logits.shape, dtype=torch.bool)
    allowed[rows] = allowed_tokens(matchers, logits.shape[-1])
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def _function(tool: dict) -> dict:
    """The function of an OpenAI tool definition ({"type": "function", "function": {...}}) or the function
    itself."""
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def reply_grammar(tokenizer: TextTokenizer, chat_format_name: str = "leanseek", *, json_schema: dict | None = None,
                  any_json: bool = False, tools: list[dict] | None = None, tool_choice: str | dict = "auto",
                  strict_tools: Iterable[str] | None = None, parallel: bool = True, think: bool = True,
                  free_tokens: int | None = None) -> Grammar:
    """The whole assistant reply after the generation prompt, in leanseek's chat format:

        <think>REASONING</think>ANSWER<|end|>

    REASONING is free text (think=False: none); ANSWER follows the request:
    - json_schema (response_format json_schema) or any_json (json_object): JSON content, validating;
    - tools (OpenAI tool definitions) with tool_choice "auto": content, or content then calls
      `<|tool_call|>NAME<|tool_args|>ARGS` (one or more; one when not parallel); "required": at least one call;
      a named function ("NAME", {"name": ...} or {"type": "function", "function": {"name": ...}}): calls to that
      function only; "none": no calls. A call's ARGS validate against its function's parameters when the function
      is strict (strict_tools: the names to treat so; None: those whose definition says "strict": true), and are
      any JSON object otherwise.
    Text (reasoning, content) never holds a special token. free_tokens bounds the free text before what the request
    enforces (the reasoning, and the content before a required call) so that a model that never closes it still
    leaves the rest of its token budget to the JSON or the call. Raises GrammarError for what it cannot build."""
    if chat_format_name != "leanseek":
        raise GrammarError(f"constrained replies are written for leanseek's chat format, not {chat_format_name!r}")
    functions = [_function(t) for t in tools or []]
    names = [f.get("name") for f in functions]
    if tool_choice == "none":
        functions = []
    elif tool_choice not in ("auto", "required"):
        choice = tool_choice if isinstance(tool_choice, str) else _function(tool_choice).get("name")
        if choice not in names:
            raise GrammarError(f"tool_choice names the function {choice!r}, which is not among the tools")
        functions = [functions[names.index(choice)]]
    if tool_choice != "auto" and tool_choice != "none" and not functions:
        raise GrammarError(f"tool_choice {tool_choice!r} needs tools")
    strict = {f.get("name") for f in functions if f.get("strict")} if strict_tools is None else set(strict_tools)
    if json_schema is not None or any_json:
        content = "content: json\njson: " + _json_rule(json_schema)
    else:
        content = "content: TEXT"
    bound = "" if free_tokens is None else f"[max_tokens={max(free_tokens, 0)}]"
    rules = [f"start: {_special(tokenizer, THINK)} {'think ' if think else ''}{_special(tokenizer, END_THINK)} "
             f"body {_special(tokenizer, END_OF_TURN)}", content, f"TEXT: {_TEXT}", f"think{bound}: {_TEXT}",
             f"lead{bound}: {_TEXT}"]
    if functions:
        calls = "call+" if parallel else "call"
        rules.append(f"body: content | lead {calls}" if tool_choice == "auto" else f"body: lead {calls}")
        rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(functions))))
        opening, args = _special(tokenizer, TOOL_CALL), _special(tokenizer, TOOL_ARGS)
        for i, f in enumerate(functions):
            schema = f.get("parameters") if f.get("name") in strict else None
            rules.append(f"call_{i}: {opening} {json.dumps(f.get('name'))} {args} args_{i}")
            rules.append(f"args_{i}: {_json_rule(schema or {'type': 'object'})}")
    else:
        rules.append("body: content")
    return _compiled(tokenizer, "\n".join(rules) + "\n")
