"""Science multiple choice, SciKnowEval style (SPEC section 7): the answer letter goes in
``<answer>X</answer>``; reward 1 iff the last such tag holds exactly the right letter; no feedback
(the paper's setting: the teacher learns only from successful siblings)."""

from __future__ import annotations

import re
import string
from typing import Any

from environments.base import Environment, Task, Verdict
from environments.loaders import load_rows, require

_ANSWER = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
INSTRUCTIONS = "Think about the question, then give the letter of the correct option inside <answer></answer>, e.g. <answer>A</answer>."


def extract_answer(completion: str) -> str | None:
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def options_of(row: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """(letter, text) pairs from ``choices`` as a list, a {letter: text} dict, or the hub's
    {"text": [...], "label": [...]}."""
    choices = require(row, "choices", where)
    if isinstance(choices, dict) and "text" in choices:
        labels = choices.get("label") or list(string.ascii_uppercase[: len(choices["text"])])
        return list(zip(labels, choices["text"]))
    if isinstance(choices, dict):
        return list(choices.items())
    return list(zip(string.ascii_uppercase, choices))


class MCQ(Environment):
    """``dataset``: ``"sample"``, a local file, or a hub name (e.g. ``hicai-zju/SciKnowEval``);
    ``domain`` / ``level`` keep only matching rows (SciKnowEval's ``domain`` and ``details.level``).
    Rows: ``question``, ``choices``, ``answer`` (or ``answerKey``)."""

    def __init__(self, dataset: str = "sample", config: str | None = None, domain: str | None = None,
                 level: str | None = None, limit_per_split: int | None = None, splits: dict[str, str] | None = None):
        self.dataset, self.config, self.domain, self.level = dataset, config, domain, level
        self.limit, self.splits = limit_per_split, splits or {}

    def tasks(self, split: str) -> list[Task]:
        rows = load_rows(self.dataset, self.splits.get(split, split), config=self.config, sample="mcq_sample.jsonl")
        if self.domain:
            rows = [r for r in rows if str(r.get("domain", "")).lower() == self.domain.lower()]
        if self.level:
            rows = [r for r in rows if str((r.get("details") or {}).get("level", r.get("level", ""))) == self.level]
        tasks = []
        for i, row in enumerate(rows[: self.limit]):
            where = f"mcq dataset row {i}"
            answer = row.get("answer", row.get("answerKey"))
            if answer is None:
                raise ValueError(f"{where}: no 'answer' (or 'answerKey') field (fields: {sorted(row)})")
            options = "\n".join(f"{letter}. {text}" for letter, text in options_of(row, where))
            content = f"{require(row, 'question', where)}\n\n{options}\n\n{INSTRUCTIONS}"
            tasks.append(Task(id=str(row.get("id", f"{split}-{i}")), messages=[{"role": "user", "content": content}],
                              data={"answer": str(answer).strip()}, demonstration=row.get("demonstration")))
        return tasks

    def verify(self, task: Task, completion: str) -> Verdict:
        got = extract_answer(completion)
        return Verdict(reward=float(got == task.data["answer"]), info={"extracted": got})
