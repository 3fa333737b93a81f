"""'Look it up': "What does 'w' mean?" with the built-in `define` tool offered (leanseek.tools), for words the model
was never taught to define directly. The reward is the word-overlap F1 of the final answer with the first line
`define` gives ("lemma (pos): gloss", as the SFT tool conversations answer), so a reply that looks the word up and
reports the first sense scores near 1 and a made-up gloss near chance (the report card's tool probe scores the
same way, eval.probes.gloss_f1).

Training words are instructions.word_group's "lookup" group (only ever defined through the tool); the held-out
test words its "held_out" group, in no conversation and never trained on. Taught words are left out: which of
them SFT actually taught is known only to the run, so a penalty for looking one up needlessly would punish
words the model never saw.

The words, the tool and the F1 are imported where used: leanseek.data and leanseek.eval import this package.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.tokenizer import TOOL_CALL
from .base import TEST_SEED, Problem, Task, Verdict, split_completion

PASS_F1 = 0.5  # a reply counts as right (pass@1) from this F1 on
QUESTION = "What does '{w}' mean?"  # the held-out set's wording, the tool probe's


@dataclass(frozen=True)
class GlossVerdict(Verdict):
    f1: float = 0.0

    def reward(self, format_reward: float = 0.0) -> float:
        """The F1; at least format_reward for a well-formed answer."""
        return max(self.f1, format_reward if self.formatted else 0.0)


class Define(Task):
    name = "define"
    description = "what a word means, with the define tool offered; reward: F1 with WordNet's first sense"
    graded = True  # the reward is the F1, between 0 and 1

    @property
    def tools(self) -> list[dict]:
        from ..tools import tool_definitions

        return tool_definitions()

    def problem(self, word: str, question: str = QUESTION) -> Problem:
        from ..tools import define

        first = define(word).split("\n")[0]
        part = first.split("(", 1)[-1].split(")", 1)[0] if "(" in first else ""
        return Problem(question.format(w=word), first, part, (word,))

    def draw(self, rng: random.Random) -> Problem:
        from ..data.instructions import DEFINITION_QUESTIONS

        return self.problem(rng.choice(_words("lookup")), rng.choice(DEFINITION_QUESTIONS))

    def reasoning(self, problem: Problem) -> str:
        """What the SFT tool conversations think before the call (instructions.tool_chats, which write the call
        and its result too: a define conversation is theirs to make, not task_chats')."""
        from ..data.instructions import UNKNOWN

        return UNKNOWN.format(w=problem.data[0])

    def check(self, problem: Problem, answer: str) -> bool:
        return _f1(answer, problem.answer) >= PASS_F1

    def verdict(self, problem: Problem, completion: str) -> GlossVerdict:
        """Judged on the reply's last turn: a well-formed answer with no tool call left in it."""
        parts = split_completion(completion)
        if parts is None or not parts[1] or TOOL_CALL in parts[1]:
            return GlossVerdict(False, False, None)
        f1 = _f1(parts[1], problem.answer)
        return GlossVerdict(f1 >= PASS_F1, True, parts[1], f1)

    def test_set(self, n: int = 500) -> list[Problem]:
        """The first n held-out words in a fixed shuffle, asked as the tool probe asks."""
        words = _words("held_out")
        return [self.problem(w) for w in random.Random(TEST_SEED).sample(words, min(n, len(words)))]

    def train_set(self, n: int, seed: int = 0, test_size: int = 500) -> list[Problem]:
        """n distinct lookup words from `seed`, each in one of the SFT set's question wordings."""
        from ..data.instructions import DEFINITION_QUESTIONS

        words = _words("lookup")
        if n > len(words):
            raise ValueError(f"task 'define' has {len(words)} lookup words, fewer than the {n} asked for")
        rng = random.Random(seed)
        return [self.problem(w, rng.choice(DEFINITION_QUESTIONS)) for w in rng.sample(words, n)]


def _words(group: str) -> list[str]:
    from ..data.instructions import split_words

    words = split_words()[group]
    if not words:
        raise ValueError("task 'define' needs WordNet (apt-get install wordnet-base)")
    return words


def _f1(answer: str, reference: str) -> float:
    from ..eval.probes import gloss_f1

    return gloss_f1(answer, reference)
