"""Pair sums: a rich-feedback task with long, structured answers, for showing SDPO's edge on CPU.

A question lists ``fields`` pairs of digits; the answer is the sum of each pair, two digits each,
separated by spaces::

    add pairs: 35 78 22 94   ->   08 15 04 13

The reward is 1 only when every field is right, so success is the product of per-field accuracies:
a model right on half the fields succeeds ~6% of the time with 4 fields and ~1.5% with 6
(``fields`` is the difficulty knob). Most GRPO groups are then all-failure and carry no signal.

The feedback locates the error, as a judge does, without printing the whole answer: it quotes the
attempt and puts a mark under every field::

    got  08 14 04 12
    mark ok 15 ok lo

``ok`` is a right field; for the first ``reveal`` wrong fields the mark is the right value (as a
judge prints the expected output of up to two failing tests); later wrong fields only get the
direction, ``hi`` (too high) or ``lo`` (too low). With ``reveal < fields`` the correct answer is
never printed whole. The marks sit under the fields they judge so that a model reading the
feedback can align them by position.
"""

from __future__ import annotations

import random

from environments.answers import strip_thinking
from environments.base import Environment, Task, Verdict

SPLIT_SEED = 4321  # fixed: the warm-start model and every run must agree on the held-out split
HELD_OUT = 256
TRAIN_SIZE = 20_000
PREFIX = "add pairs: "
ANSWER_LABEL, MARKS_LABEL = "got  ", "mark "  # same width: each mark sits under its field
MAX_QUOTED_CHARS = 60


def question(pairs: list[tuple[int, int]]) -> str:
    return PREFIX + " ".join(f"{a}{b}" for a, b in pairs)


def answer(pairs: list[tuple[int, int]]) -> str:
    return " ".join(f"{a + b:02d}" for a, b in pairs)


def split_questions(split: str, fields: int) -> list[list[tuple[int, int]]]:
    """Deterministic, disjoint splits: the first ``HELD_OUT`` distinct questions drawn are the test
    split, the next ``TRAIN_SIZE`` distinct ones the training split."""
    if split not in ("train", "test"):
        raise ValueError(f"pair_sums has splits 'train' and 'test', not {split!r}")
    rng = random.Random(SPLIT_SEED * 100 + fields)
    seen: set[tuple[tuple[int, int], ...]] = set()
    out: list[list[tuple[int, int]]] = []
    want = HELD_OUT if split == "test" else HELD_OUT + TRAIN_SIZE
    while len(seen) < want:
        q = tuple((rng.randrange(10), rng.randrange(10)) for _ in range(fields))
        if q not in seen:
            seen.add(q)
            out.append(list(q))
    return out[:HELD_OUT] if split == "test" else out[HELD_OUT:]


def marks(got: list[int], expected: list[int], reveal: int) -> list[str]:
    """One two-character mark per field: "ok", the right value (the first ``reveal`` wrong fields),
    or "hi"/"lo"."""
    out, revealed = [], 0
    for g, e in zip(got, expected):
        if g == e:
            out.append("ok")
        elif revealed < reveal:
            out.append(f"{e:02d}")
            revealed += 1
        else:
            out.append("hi" if g > e else "lo")
    return out


def parse_fields(text: str, fields: int) -> list[int] | None:
    """The field values, or None unless ``text`` is exactly ``fields`` two-digit numbers."""
    parts = text.strip().split(" ")
    if len(parts) != fields or not all(len(p) == 2 and p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def field_accuracy(completion: str, expected: list[int]) -> float:
    """The fraction of the question's fields whose place in the answer holds the right two-digit sum,
    counted position by position, so that an answer with too few or too many fields (a model
    warm-started on fewer fields) still shows what it got right."""
    got = completion.strip().split(" ")
    return sum(i < len(got) and got[i] == f"{e:02d}" for i, e in enumerate(expected)) / len(expected)


def feedback_text(completion: str, expected: list[int], reveal: int) -> str:
    """The judge's text for a wrong ``completion`` (assumed wrong: the caller checks success)."""
    got = parse_fields(completion, len(expected))
    if got is None:
        quoted = completion.strip()[:MAX_QUOTED_CHARS]
        return (f"Your answer {quoted!r} is not {len(expected)} two-digit sums separated by single spaces, "
                f"like {' '.join(['00'] * len(expected))}.")
    return f"{ANSWER_LABEL}{' '.join(f'{g:02d}' for g in got)}\n{MARKS_LABEL}{' '.join(marks(got, expected, reveal))}"


class PairSums(Environment):
    """``fields``: pairs per question (difficulty). ``reveal``: wrong fields whose right value the
    feedback shows (the others get a direction). ``feedback=False`` gives the bare 0/1 reward."""

    def __init__(self, fields: int = 4, reveal: int = 2, feedback: bool = True, limit_per_split: int | None = None):
        if not 1 <= fields <= 12:
            raise ValueError(f"pair_sums: fields={fields} must be between 1 and 12")
        if not 0 <= reveal < fields:
            raise ValueError(f"pair_sums: reveal={reveal} must be between 0 and fields-1={fields - 1}, "
                             "so that the feedback never prints the whole answer")
        self.fields, self.reveal, self.feedback = fields, reveal, feedback
        self.limit_per_split = limit_per_split

    def tasks(self, split: str) -> list[Task]:
        qs = split_questions(split, self.fields)[: self.limit_per_split]
        return [Task(id=f"{split}-{i}", messages=[{"role": "user", "content": question(q)}],
                     data={"answer": answer(q)}) for i, q in enumerate(qs)]

    def verify(self, task: Task, completion: str) -> Verdict:
        expected = task.data["answer"]
        answer = strip_thinking(completion)  # thinking is never judged (environments/answers.py)
        fields = [int(x) for x in expected.split(" ")]
        # partial progress that the all-or-nothing reward hides (logged as env/field_accuracy)
        info = {"metrics": {"field_accuracy": field_accuracy(answer, fields)}}
        if answer.strip() and answer.strip() == expected:
            return Verdict(reward=1.0, info=info)
        if not self.feedback:
            return Verdict(reward=0.0, info=info)
        return Verdict(reward=0.0, feedback=feedback_text(answer, fields, self.reveal), info=info)
