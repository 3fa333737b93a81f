"""'Think or guess': the sum of 3 to 5 two-digit numbers. A small model adds two numbers reliably but not five at
once, so writing the running sums in <think> (47+18=65 65+93=158 ...) pays and answering at once is a guess.
SFT shows both ways; GRPO should learn to think (spec/grpo.md section 6.3, task 1)."""

from __future__ import annotations

import random

from .base import Problem, Task, parse_integer


class Sums(Task):
    name = "sums"
    description = "sum of 3-5 two-digit numbers; reasoning optional (think or guess)"

    def draw(self, rng: random.Random) -> Problem:
        terms = [rng.randint(10, 99) for _ in range(rng.randint(3, 5))]
        return Problem("+".join(map(str, terms)), str(sum(terms)), f"{len(terms)} terms", tuple(terms))

    def reasoning(self, problem: Problem) -> str:
        total, steps = problem.data[0], []
        for t in problem.data[1:]:
            steps.append(f"{total}+{t}={total + t}")
            total += t
        return " ".join(steps)

    def check(self, problem: Problem, answer: str) -> bool:
        return parse_integer(answer) == sum(problem.data)
