"""The built-in instruction set for SFT (`leanseek sft --data builtin`), made from the built-in corpus and the
reasoning tasks, so a model can be taught to chat with no download:

- definitions: "What does 'harbor' mean?" answered with WordNet's gloss (when wordnet-base is installed);
- tool use: the same questions with the built-in `define` tool offered (leanseek.tools): words taught directly are
  answered at once, the others through a call to `define` and its result. WordNet's single words are split for
  good by a salted hash (`word_group`): "held_out" words are never in any conversation (the probes measure
  definitions of words the model was never taught, with and without the tool), "lookup" words are only ever
  defined through the tool, and only "taught" words are answered directly;
- Python: "What does json.dumps do?" answered with the first paragraph of its standard-library docstring;
- greetings: a few hundred "Hello" / "Who are you?" exchanges, so the assistant can say what it is;
- reasoning: the tasks of leanseek.tasks with worked reasoning in <think>. For `sums` ("think or guess") only
  part of the answers think aloud; the rest answer at once, which a small model gets wrong more often: GRPO
  has something to find.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import cache

from ..tasks import get_task
from .builtin import BUILTINS, stdlib_docstrings, wordnet_synsets
from .sources import SourceStats

WORD_SPLIT_SALT = "leanseek word split 1"  # changing it changes which words are held out
HELD_OUT_PER_MILLE, LOOKUP_PER_MILLE = 20, 300  # of WordNet's words; the rest may be taught directly

DEFINITION_QUESTIONS = ["What does '{w}' mean?", "Define '{w}'.", "What is the meaning of '{w}'?"]
DEFINITION_QUESTION = re.compile(r"^(?:What does|Define|What is the meaning of) '(.+)'(?: mean)?[?.]$")  # its word
KNOWN = "I know the word '{w}'."
UNKNOWN = "I do not know the word '{w}'. I will look it up."
PYTHON_QUESTIONS = ["What does {n} do?", "Explain {n} in Python.", "What is {n} for?"]
GREETINGS = {
    "Hello!": "Hello! I am leanseek, a small DeepSeek-style assistant. Ask me what a word means, or to add up some "
              "numbers.",
    "Hi": "Hi! What would you like to know? I can define words and add up numbers.",
    "Who are you?": "I am leanseek: a small mixture-of-experts model with DeepSeek-V3's architecture, trained from "
                    "scratch on a built-in corpus, then taught to chat and, with GRPO, to reason.",
    "What can you do?": "I can define English words and add up numbers such as 12+34+56, thinking step by step.",
    "How were you trained?": "Pretraining on a built-in corpus (dictionaries, WordNet, Python's documentation), "
                             "supervised fine-tuning on conversations, then GRPO reinforcement learning on sums.",
    "Thank you!": "You are welcome!",
    "Goodbye": "Goodbye!",
}
TASK_COUNTS = {"sums": 6000, "addition": 1500, "countdown": 1500}
SUMS_THINK_RATE = 0.5  # the share of sums answered with the running sums written out


def word_group(word: str) -> str:
    """"held_out" (in no conversation: the probes' untaught words), "lookup" (defined only through the tool) or
    "taught" (may be answered directly), fixed by a salted hash of the lower-cased word."""
    digest = hashlib.sha256(f"{WORD_SPLIT_SALT}:{word.lower()}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 1000
    return "held_out" if bucket < HELD_OUT_PER_MILLE else "lookup" if bucket < HELD_OUT_PER_MILLE + LOOKUP_PER_MILLE \
        else "taught"


@cache
def split_words() -> dict[str, list[str]]:
    """WordNet's single words (lower-case letters, at least 3) by word_group, each list sorted; empty lists when
    WordNet is not installed."""
    from ..tools import wordnet

    groups = {"held_out": [], "lookup": [], "taught": []}
    if wordnet().available():
        for word in wordnet().lemmas():
            if re.fullmatch(r"[a-z]{3,}", word):
                groups[word_group(word)].append(word)
    return groups


def definitions(rng: random.Random, n: int, taught_only: bool = False) -> list[list[dict]]:
    """n questions "What does 'w' mean?" (in three wordings) answered with a WordNet synset's gloss and synonyms.
    taught_only: leave out the synsets that show a held-out or lookup word (as runs that teach the tool must;
    off, the sample is the one runs made before tool use drew)."""
    if n <= 0 or not BUILTINS["wordnet"].available():
        return []
    synsets = [(pos, words, gloss.split(";")[0].strip()) for pos, words, gloss in wordnet_synsets()]
    if taught_only:
        synsets = [s for s in synsets if all(word_group(w) == "taught" for w in s[1][:4])]
    chats = []
    for pos, words, gloss in rng.sample(synsets, min(n, len(synsets))):
        word = words[0]
        answer = f"{word} ({pos}): {gloss}."
        if len(words) > 1:
            answer += f" Also: {', '.join(words[1:4])}."
        chats.append(_chat(rng.choice(DEFINITION_QUESTIONS).format(w=word), answer))
    return chats


def tool_chats(rng: random.Random, n: int, taught: list[list[dict]], direct_share: float = 0.25) -> list[dict]:
    """n conversations with the built-in tools offered ({"messages", "tools"}, OpenAI's fine-tuning form): at
    direct_share, a question of `taught` (definitions' conversations) answered at once as it was taught; the rest
    a lookup word's question answered through a call to `define`, its result, and the first sense as the
    answer."""
    from ..tools import define, tool_definitions

    lookups = split_words()["lookup"]
    if n <= 0 or not lookups:
        return []
    tools, chats = tool_definitions(), []
    for i in range(n):
        if taught and rng.random() < direct_share:
            question, answer = rng.choice(taught)
            word = DEFINITION_QUESTION.match(question["content"]).group(1)
            messages = [question, {"role": "assistant", "reasoning_content": KNOWN.format(w=word),
                                   "content": answer["content"]}]
        else:
            word = rng.choice(lookups)
            result = define(word)
            call = {"id": f"call_{i}", "type": "function",
                    "function": {"name": "define", "arguments": json.dumps({"word": word})}}
            messages = [{"role": "user", "content": rng.choice(DEFINITION_QUESTIONS).format(w=word)},
                        {"role": "assistant", "reasoning_content": UNKNOWN.format(w=word), "content": "",
                         "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call["id"], "content": result},
                        {"role": "assistant", "reasoning_content": "", "content": result.split("\n")[0] + "."}]
        chats.append({"messages": messages, "tools": tools})
    return chats


def python_answers(rng: random.Random, n: int) -> list[list[dict]]:
    if n <= 0:
        return []
    entries = []
    for _, docs in stdlib_docstrings(SourceStats("python-docstrings")):
        for name, doc in docs:
            if "._" in name or name.startswith("_") or "." not in name:
                continue
            first = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            if 30 <= len(first) <= 400:
                entries.append((name, first))
    return [_chat(rng.choice(PYTHON_QUESTIONS).format(n=name), doc)
            for name, doc in rng.sample(entries, min(n, len(entries)))]


def greetings(rng: random.Random, n: int) -> list[list[dict]]:
    """Small talk, the questions in a few casings and punctuations."""
    chats = []
    for _ in range(n):
        question, answer = rng.choice(list(GREETINGS.items()))
        question = rng.choice([question, question.lower(), question.rstrip("!?") + rng.choice(["", "!", "?"])])
        chats.append(_chat(question, answer))
    return chats


def task_chats(rng: random.Random, name: str, n: int, seed: int, think_rate: float = 1.0) -> list[list[dict]]:
    """SFT conversations for a task's training problems: reasoning in <think> at think_rate, else answered at
    once."""
    task = get_task(name)
    return [_chat(p.prompt, p.answer, task.reasoning(p) if rng.random() < think_rate else "")
            for p in task.train_set(n, seed)]


def builtin_chats(seed: int = 0, n_definitions: int = 4000, n_python: int = 2000, n_greetings: int = 200,
                  tasks: dict[str, int] | None = None, sums_think_rate: float = SUMS_THINK_RATE,
                  n_tools: int = 0) -> list[list[dict] | dict]:
    """The whole built-in set, shuffled by seed: messages lists, and with n_tools, conversations that offer the
    built-in tools as {"messages", "tools"}."""
    rng = random.Random(seed)
    taught = definitions(rng, n_definitions, taught_only=n_tools > 0)
    chats = taught + python_answers(rng, n_python) + greetings(rng, n_greetings)
    chats += tool_chats(rng, n_tools, taught)
    for name, n in (TASK_COUNTS if tasks is None else tasks).items():
        chats += task_chats(rng, name, n, seed, sums_think_rate if name == "sums" else 1.0)
    rng.shuffle(chats)
    return chats


def _chat(question: str, answer: str, reasoning: str | None = None) -> list[dict]:
    reply = {"role": "assistant", "content": answer}
    if reasoning is not None:
        reply["reasoning_content"] = reasoning
    return [{"role": "user", "content": question}, reply]
