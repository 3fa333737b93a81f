"""Countdown: reach a target with three given numbers, each used exactly once, with + - * / and parentheses (the
task TinyZero used to reproduce R1-Zero; spec/grpo.md section 6.3, task 3). Many answers can be right, so the
checker parses the expression itself: a whitelist of characters, the multiset of numbers, exact rational
arithmetic; no `eval` of model text."""

from __future__ import annotations

import functools
import itertools
import random
import re
from fractions import Fraction

from .base import Problem, Task

OPS = "+-*/"
MAX_CHARS = 40


def _apply(x: Fraction, op: str, y: Fraction) -> Fraction | None:
    if op == "/":
        return None if y == 0 else x / y
    return x + y if op == "+" else x - y if op == "-" else x * y


@functools.lru_cache(maxsize=None)
def solutions(numbers: tuple[int, ...], target: int) -> list[tuple[str, list[str]]]:
    """Every (expression, reasoning steps) over both bracketings and all orders that reaches target."""
    out = []
    for a, b, c in set(itertools.permutations(numbers)):
        for o1, o2 in itertools.product(OPS, repeat=2):
            left = _apply(Fraction(a), o1, Fraction(b))  # (a o1 b) o2 c
            if left is not None and _apply(left, o2, Fraction(c)) == target:
                out.append((f"({a}{o1}{b}){o2}{c}", [f"{a}{o1}{b}={_show(left)}", f"{_show(left)}{o2}{c}={target}"]))
            right = _apply(Fraction(b), o2, Fraction(c))  # a o1 (b o2 c)
            if right is not None and _apply(Fraction(a), o1, right) == target:
                out.append((f"{a}{o1}({b}{o2}{c})", [f"{b}{o2}{c}={_show(right)}", f"{a}{o1}{_show(right)}={target}"]))
    return sorted(out)


def _show(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """(value, numbers used) of an arithmetic expression over non-negative integers with + - * / and
    parentheses, or None if it is not one (or divides by zero). A recursive-descent parser, not eval."""
    if len(expression) > MAX_CHARS or not re.fullmatch(r"[0-9+\-*/() ]+", expression):
        return None
    tokens = re.findall(r"\d+|[+\-*/()]", expression)
    numbers: list[int] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def factor() -> Fraction:
        tok = peek()
        if tok is None:
            raise ValueError
        if tok == "(":
            take()
            value = expr()
            if peek() != ")":
                raise ValueError
            take()
            return value
        if not tok.isdigit() or len(tok) > 6:
            raise ValueError
        numbers.append(int(take()))
        return Fraction(numbers[-1])

    def chain(operand, ops: str) -> Fraction:
        value = operand()
        while peek() is not None and peek() in ops:
            value = _apply(value, take(), operand())
            if value is None:
                raise ZeroDivisionError
        return value

    def term() -> Fraction:
        return chain(factor, "*/")

    def expr() -> Fraction:
        return chain(term, "+-")

    try:
        value = expr()
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return (value, numbers) if pos == len(tokens) else None


class Countdown(Task):
    name = "countdown"
    description = "reach a target with three numbers 1-9, each once, with + - * / and parentheses"

    def draw(self, rng: random.Random) -> Problem:
        while True:
            numbers = tuple(sorted(rng.randint(1, 9) for _ in range(3)))
            a, b, c = rng.sample(numbers, 3)
            o1, o2 = rng.choice(OPS), rng.choice(OPS)
            inner = _apply(Fraction(a), o1, Fraction(b))
            value = None if inner is None else _apply(inner, o2, Fraction(c))
            if value is None or value.denominator != 1 or not 1 <= value <= 100:
                continue
            target = int(value)
            found = solutions(numbers, target)
            n = len(found)
            bucket = "1-2 solutions" if n <= 2 else "3-9 solutions" if n < 10 else "10+ solutions"
            return Problem(f"Use {' '.join(map(str, numbers))} to make {target}", found[0][0], bucket,
                           (numbers, target))

    def reasoning(self, problem: Problem) -> str:
        numbers, target = problem.data
        return " ".join(dict(solutions(numbers, target))[problem.answer])

    def check(self, problem: Problem, answer: str) -> bool:
        numbers, target = problem.data
        parsed = evaluate(answer)
        return parsed is not None and parsed[0] == target and sorted(parsed[1]) == sorted(numbers)
