"""Verifiable reasoning tasks for SFT, GRPO, distillation and evaluation."""

from .addition import Addition
from .base import Problem, Task, Verdict, split_completion
from .countdown import Countdown
from .define import Define
from .sums import Sums

TASKS: dict[str, Task] = {t.name: t for t in (Sums(), Addition(), Countdown(), Define())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def parse_mix(spec: str) -> list[tuple[Task, int]]:
    """The tasks of --task and their weights: "sums", "sums,define", "sums:3,define:1"."""
    mix, seen = [], set()
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name in seen:
            raise ValueError(f"--task {spec!r}: {name!r} is named twice")
        if weight and not (weight.isdigit() and int(weight) > 0):
            raise ValueError(f"--task {spec!r}: the weight of {name!r} must be a positive integer, not {weight!r}")
        seen.add(name)
        mix.append((get_task(name), int(weight or 1)))
    return mix


__all__ = ["TASKS", "Addition", "Countdown", "Define", "Problem", "Sums", "Task", "Verdict", "get_task", "parse_mix",
           "split_completion"]
