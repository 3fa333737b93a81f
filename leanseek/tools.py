"""The built-in tools that `leanseek chat`, the web chat and the speedrun's probes run themselves (API clients get
`tool_calls` and run their own tools, as OpenAI's semantics say). One for now: `define(word)`, which looks a word
up in WordNet, read from Debian's wordnet-base files (the ones the built-in corpus is made from), so it works
offline.

`run_tool(name, arguments)` never raises for what a model may write (an unknown tool, arguments that are not JSON,
a missing field): it returns an error text, which goes back to the model as the tool's result."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .data.builtin import WORDNET

MAX_SENSES = 3
MAX_TOOL_ROUNDS = 4  # rounds of tool calls one turn may make where leanseek runs the tools (chat, web, probes)
MAX_ARGUMENT_CHARS = 100
PARTS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}  # WordNet's letters -> its files' (and the corpus') names
# WordNet's detachment rules (morphy): an inflected ending and the base forms it may come from
ENDINGS = {"n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                 ("men", "man"), ("ies", "y")],
           "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                 ("ing", "")],
           "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
           "r": []}


class WordNet:
    """Word look-ups in WordNet's index and data files: each index line lists a lemma's synsets by their byte
    offsets in the data file, most frequent sense first."""

    def __init__(self, root: Path = WORDNET):
        self.root = root

    def available(self) -> bool:
        return all((self.root / f"{kind}.{name}").exists() for name in PARTS.values() for kind in ("index", "data"))

    @cache
    def _index(self, pos: str) -> dict[str, tuple[int, list[int]]]:
        """lemma -> (how often its senses were seen in WordNet's tagged texts, synset offsets)."""
        index = {}
        with open(self.root / f"index.{PARTS[pos]}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue  # licence header
                fields = line.split()
                n_synsets, n_pointers = int(fields[2]), int(fields[3])
                tagged = int(fields[5 + n_pointers])
                index[fields[0]] = (tagged, [int(x) for x in fields[-n_synsets:]])
        return index

    @cache
    def _exceptions(self, pos: str) -> dict[str, list[str]]:
        """Irregular forms -> base forms ("geese" -> "goose")."""
        out = {}
        path = self.root / f"{PARTS[pos]}.exc"
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                form, *bases = line.split()
                out[form] = bases
        return out

    def _gloss(self, pos: str, offset: int) -> str:
        with open(self.root / f"data.{PARTS[pos]}", "rb") as f:
            f.seek(offset)
            line = f.readline().decode("utf-8", errors="replace")
        return line.split(" | ", 1)[1].split(";")[0].strip() if " | " in line else ""

    def lemmas(self) -> list[str]:
        """Every lemma of every part of speech, sorted (multi-word ones with spaces)."""
        return sorted({lemma.replace("_", " ") for pos in PARTS for lemma in self._index(pos)})

    def base_forms(self, word: str, pos: str) -> list[str]:
        """The lemmas `word` may be a form of, in this part of speech: itself, an irregular form's base, or what
        the detachment rules give."""
        index = self._index(pos)
        candidates = [word, *self._exceptions(pos).get(word, [])]
        candidates += [word[: len(word) - len(end)] + base for end, base in ENDINGS[pos] if word.endswith(end)]
        return [w for w in dict.fromkeys(candidates) if w in index]

    def senses(self, word: str, limit: int | None = None) -> list[tuple[str, str, str]]:
        """(lemma, part of speech, definition) for each sense of `word` (the first `limit`): first the most frequent
        sense of each part of speech (the part seen most often first), then the other senses in WordNet's order."""
        key = re.sub(r"\s+", "_", word.strip().lower())
        per_part = []
        for pos in PARTS:
            for lemma in self.base_forms(key, pos)[:1]:
                tagged, offsets = self._index(pos)[lemma]
                per_part.append((tagged, pos, lemma, offsets))
        per_part.sort(key=lambda p: -p[0])  # stable: nouns before verbs before adjectives at equal counts
        order = [(pos, lemma, o[0]) for _, pos, lemma, o in per_part]
        order += [(pos, lemma, offset) for _, pos, lemma, o in per_part for offset in o[1:]]
        return [(lemma.replace("_", " "), PARTS[pos], self._gloss(pos, offset))
                for pos, lemma, offset in order[:limit]]


@cache
def wordnet() -> WordNet:
    return WordNet()


def define(word: str) -> str:
    """The tool's result: up to MAX_SENSES lines "lemma (part of speech): definition", or why there is none."""
    if not wordnet().available():
        return "error: the dictionary is not installed (WordNet: apt-get install wordnet-base)"
    senses = wordnet().senses(word, MAX_SENSES)
    if not senses:
        return f"no definition found for '{word}'"
    return "\n".join(f"{lemma} ({pos}): {gloss}" for lemma, pos, gloss in senses)


@dataclass(frozen=True)
class Tool:
    """A built-in tool: its definition for the model, and the function that runs it on its arguments (each a
    string: run_tool checks them against `parameters`' properties)."""

    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    run: Callable[..., str]

    def definition(self) -> dict:
        """The OpenAI tool definition a request's `tools` carries."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


BUILTIN_TOOLS = {t.name: t for t in [
    # kept short: the definitions are in every prompt that offers the tools, and the tiny model's context is small
    Tool("define", "Look up a word in the dictionary.",
         {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}, define),
]}


def tool_definitions() -> list[dict]:
    """The built-in tools as a request's `tools`."""
    return [t.definition() for t in BUILTIN_TOOLS.values()]


def run_tool(name: str, arguments: str | dict) -> str:
    """Run a built-in tool on its arguments (JSON text, as a tool call carries them, or a dict): its result, or an
    error text for the model to read."""
    tool = BUILTIN_TOOLS.get(name)
    if tool is None:
        return f"error: no tool named {name!r}; the tools are: {', '.join(BUILTIN_TOOLS)}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            return f"error: the arguments are not JSON ({e.msg})"
    if not isinstance(arguments, dict):
        return "error: the arguments must be a JSON object"
    properties, required = tool.parameters["properties"], tool.parameters["required"]
    for key in required:
        if key not in arguments:
            return f"error: {name} needs the argument '{key}'"
    for key, value in arguments.items():
        if key not in properties:
            return f"error: {name} has no argument '{key}'; its arguments: {', '.join(properties)}"
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_ARGUMENT_CHARS:
            return f"error: '{key}' must be a non-empty string of at most {MAX_ARGUMENT_CHARS} characters"
    return tool.run(**arguments)


def assistant_message(reasoning: str, content: str, calls) -> dict:
    """The assistant message of a reply: its reasoning, its content (text around the calls) and its tool calls
    (ToolCall's from a tool-call parser), each with a fresh id, as OpenAI's API writes them."""
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return message


def tool_results(message: dict) -> list[dict]:
    """The tool messages answering an assistant message's calls, the built-in tools run on them."""
    return [{"role": "tool", "tool_call_id": call["id"],
             "content": run_tool(call["function"]["name"], call["function"]["arguments"])}
            for call in message.get("tool_calls", [])]


def add_tool_routes(app, offer: bool = True) -> None:
    """The web chat's access to the built-in tools: GET /v1/builtin-tools lists their definitions (to send as
    `tools`), POST /v1/builtin-tools/run with {"name", "arguments"} runs one and answers {"content": result}.
    offer: whether the model can take tools (its chat format's tools_error is None); if not, the list is empty
    and the page chats without them."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    def bad(message: str, param: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=400)

    async def builtin_tools(request):
        return JSONResponse({"object": "list", "data": tool_definitions() if offer else []})

    async def run_builtin_tool(request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return bad("the body is not valid JSON", "body")
        if not isinstance(body, dict):
            return bad("the body must be an object with 'name' and 'arguments'", "body")
        if not isinstance(body.get("name"), str):
            return bad("name: must be a string (a built-in tool's name)", "name")
        arguments = body.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            return bad("arguments: must be JSON text or an object", "arguments")
        return JSONResponse({"content": await run_in_threadpool(run_tool, body["name"], arguments)})

    app.add_route("/v1/builtin-tools", builtin_tools, methods=["GET"])
    app.add_route("/v1/builtin-tools/run", run_builtin_tool, methods=["POST"])
