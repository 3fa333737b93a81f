"""The built-in instruction set for SFT (`leanseek sft --data builtin`), made from the built-in corpus and the
reasoning tasks, so a model can be taught to chat with no download:

- definitions: "What does 'harbor' mean?" answered with WordNet's gloss (when wordnet-base is installed);
- Python: "What does json.dumps do?" answered with the first paragraph of its standard-library docstring;
- greetings: a few hundred "Hello" / "Who are you?" exchanges, so the assistant can say what it is;
- reasoning: the tasks of leanseek.tasks with worked reasoning in <think>. For `sums` ("think or guess") only
  part of the answers think aloud; the rest answer at once, which a small model gets wrong more often: GRPO
  has something to find.
"""

from __future__ import annotations

import random
import re

from ..tasks import get_task
from .builtin import BUILTINS, stdlib_docstrings, wordnet_synsets
from .sources import SourceStats

DEFINITION_QUESTIONS = ["What does '{w}' mean?", "Define '{w}'.", "What is the meaning of '{w}'?"]
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


def definitions(rng: random.Random, n: int) -> list[list[dict]]:
    if n <= 0 or not BUILTINS["wordnet"].available():
        return []
    synsets = [(pos, words, gloss.split(";")[0].strip()) for pos, words, gloss in wordnet_synsets()]
    chats = []
    for pos, words, gloss in rng.sample(synsets, min(n, len(synsets))):
        word = words[0]
        answer = f"{word} ({pos}): {gloss}."
        if len(words) > 1:
            answer += f" Also: {', '.join(words[1:4])}."
        chats.append(_chat(rng.choice(DEFINITION_QUESTIONS).format(w=word), answer))
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
                  tasks: dict[str, int] | None = None, sums_think_rate: float = SUMS_THINK_RATE) -> list[list[dict]]:
    """The whole built-in set, shuffled by seed."""
    rng = random.Random(seed)
    chats = definitions(rng, n_definitions) + python_answers(rng, n_python) + greetings(rng, n_greetings)
    for name, n in (TASK_COUNTS if tasks is None else tasks).items():
        chats += task_chats(rng, name, n, seed, sums_think_rate if name == "sums" else 1.0)
    rng.shuffle(chats)
    return chats


def _chat(question: str, answer: str, reasoning: str | None = None) -> list[dict]:
    reply = {"role": "assistant", "content": answer}
    if reasoning is not None:
        reply["reasoning_content"] = reasoning
    return [{"role": "user", "content": question}, reply]
