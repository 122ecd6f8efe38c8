"""Two-digit addition: the CPU quickstart task. Answers are short, so this is a smoke test of the
whole system rather than a showcase for dense credit assignment."""

from __future__ import annotations

import random

from environments.answers import strip_thinking
from environments.base import Environment, Task, Verdict

HELD_OUT_PAIRS = 300
SPLIT_SEED = 1234  # fixed: the warm-start model and every run must agree on the held-out split


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100)]


def split_pairs(split: str) -> list[tuple[int, int]]:
    pairs = all_pairs()
    random.Random(SPLIT_SEED).shuffle(pairs)
    if split == "test":
        return pairs[:HELD_OUT_PAIRS]
    if split == "train":
        return pairs[HELD_OUT_PAIRS:]
    raise ValueError(f"arithmetic has splits 'train' and 'test', not {split!r}")


def question(a: int, b: int) -> str:
    return f"{a}+{b}"


class Arithmetic(Environment):
    """``feedback=True`` adds "too high"/"too low" text to wrong answers (off by default: the tiny
    warm-started model was never taught to read it)."""

    def __init__(self, feedback: bool = False, limit_per_split: int | None = None):
        self.feedback = feedback
        self.limit_per_split = limit_per_split

    def tasks(self, split: str) -> list[Task]:
        pairs = split_pairs(split)[: self.limit_per_split]
        return [
            Task(id=f"{split}-{a}+{b}", messages=[{"role": "user", "content": question(a, b)}],
                 data={"answer": str(a + b)}, demonstration=str(a + b))
            for a, b in pairs
        ]

    def verify(self, task: Task, completion: str) -> Verdict:
        expected = task.data["answer"]
        got = strip_thinking(completion).strip()  # thinking is never judged (environments/answers.py)
        if got and got == expected:
            return Verdict(reward=1.0)
        if not self.feedback:
            return Verdict(reward=0.0)
        if not got.lstrip("-").isdigit():
            return Verdict(reward=0.0, feedback=f"{got!r} is not a number.")
        direction = "too high" if int(got) > int(expected) else "too low"
        return Verdict(reward=0.0, feedback=f"{got} is {direction}.")
