"""What every verifiable task shares: problems drawn from a seed, a fixed held-out test set, worked reasoning for
SFT, and a strict rule-based reward on the model's completion.

A completion is what the assistant writes after `<|assistant|>`: `<think>REASONING</think>ANSWER<|end|>`. The
reward reads only the ANSWER, exactly: no substring search, no `eval`, one answer or none (DeepSeek-R1 used rule
rewards for this reason: a lenient verifier gets hacked).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..data.tokenizer import END_OF_TURN, END_THINK, THINK

TEST_SEED = 1_000_003  # the held-out set: one fixed draw, never used for training
MAX_DIGITS = 12  # longer "numbers" are junk, not answers


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user's message
    answer: str  # a correct answer (for countdown, one of several)
    bucket: str = ""  # difficulty, for the evaluation table
    data: tuple = field(default=(), compare=False)  # what the checker needs (operands, target, ...)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    formatted: bool  # <think>...</think>, an answer, and the end-of-turn token (not cut off)
    answer: str | None  # the parsed answer text

    def reward(self, format_reward: float = 0.0) -> float:
        """1 for a correct answer; else format_reward for a well-formed one (TinyZero's 0.1 scheme), else 0."""
        return 1.0 if self.correct else (format_reward if self.formatted else 0.0)


_COMPLETION = re.compile(re.escape(THINK) + r"(.*?)" + re.escape(END_THINK) + r"(.*?)" + re.escape(END_OF_TURN)
                         + r"\s*$", re.S)


def split_completion(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) of a well-formed completion, or None. Exactly one think block, then the answer, then
    the end-of-turn marker and nothing after it."""
    m = _COMPLETION.match(text)
    if m is None or THINK in m.group(1) or END_THINK in m.group(2) or THINK in m.group(2):
        return None
    return m.group(1), m.group(2).strip()


def parse_integer(answer: str) -> int | None:
    """An integer answer, written plainly: digits with an optional minus sign, at most MAX_DIGITS digits."""
    if not re.fullmatch(r"-?\d{1,%d}" % MAX_DIGITS, answer):
        return None
    return int(answer)


class Task:
    """A family of problems. Subclasses define draw(), reasoning() and check()."""

    name = ""
    description = ""

    def draw(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def reasoning(self, problem: Problem) -> str:
        """Worked reasoning that leads to problem.answer (the SFT target inside <think>)."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> bool:
        raise NotImplementedError

    def verdict(self, problem: Problem, completion: str) -> Verdict:
        parts = split_completion(completion)
        if parts is None:
            return Verdict(False, False, None)
        answer = parts[1]
        return Verdict(bool(answer) and self.check(problem, answer), bool(answer), answer)

    def test_set(self, n: int = 500) -> list[Problem]:
        """The fixed held-out problems: the first n distinct draws from TEST_SEED."""
        return _distinct(self, random.Random(TEST_SEED), n, exclude=set())

    def train_set(self, n: int, seed: int = 0, test_size: int = 500) -> list[Problem]:
        """n distinct problems from `seed`, none of them in the held-out set."""
        exclude = {p.prompt for p in self.test_set(test_size)}
        return _distinct(self, random.Random(seed), n, exclude)


def _distinct(task: Task, rng: random.Random, n: int, exclude: set[str]) -> list[Problem]:
    out, seen = [], set(exclude)
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        p = task.draw(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    raise ValueError(f"task {task.name!r} has fewer than {n} distinct problems outside the test set")
