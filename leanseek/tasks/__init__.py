"""Verifiable reasoning tasks for SFT, GRPO, distillation and evaluation."""

from .addition import Addition
from .base import Problem, Task, Verdict, split_completion
from .countdown import Countdown
from .sums import Sums

TASKS: dict[str, Task] = {t.name: t for t in (Sums(), Addition(), Countdown())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Addition", "Countdown", "Problem", "Sums", "Task", "Verdict", "get_task", "split_completion"]
