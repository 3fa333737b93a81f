"""Multi-digit addition with carries: a + b with 3 to 5 digits each. The worked reasoning adds column by column
from the right, carrying; difficulty is the number of carries (spec/grpo.md section 6.3, task 2)."""

from __future__ import annotations

import random

from .base import Problem, Task, parse_integer


def columns(a: int, b: int) -> list[tuple[int, int, int]]:
    """(digit of a, digit of b, carry in) for each column, rightmost first."""
    out, carry = [], 0
    while a or b:
        da, db = a % 10, b % 10
        out.append((da, db, carry))
        carry = (da + db + carry) // 10
        a, b = a // 10, b // 10
    return out


class Addition(Task):
    name = "addition"
    description = "a+b with 3-5 digits each; reasoning: column sums with carries"

    def draw(self, rng: random.Random) -> Problem:
        n = rng.randint(3, 5)
        a, b = (rng.randint(10 ** (n - 1), 10 ** n - 1) for _ in range(2))
        carries = sum(1 for da, db, c in columns(a, b) if da + db + c >= 10)
        return Problem(f"{a}+{b}", str(a + b), f"{carries} carries", (a, b))

    def reasoning(self, problem: Problem) -> str:
        return " ".join(f"{da}+{db}{'+1' if c else ''}={da + db + c}" for da, db, c in columns(*problem.data))

    def check(self, problem: Problem, answer: str) -> bool:
        return parse_integer(answer) == sum(problem.data)
