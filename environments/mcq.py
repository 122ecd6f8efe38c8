"""Science multiple choice, SciKnowEval style (SPEC section 7): the answer letter goes in
``<answer>X</answer>``; reward 1 iff the last such tag, outside any thinking, holds exactly the right
letter; no feedback (the paper's setting: the teacher learns only from successful siblings).

The right letter is SciKnowEval's ``answerKey``. Its rows also carry ``answer``, which is empty on
multiple-choice rows (it holds the text answer of the "filling" and generation tasks), so reading
``answer`` first would pay an empty ``<answer></answer>`` and score the right letter 0; the key is
read first, an empty key falls back to ``answer``, and a row with neither, or with a key that is not
one of its options, is refused at load time.

Rows prepared by ``python -m sdpo.data prepare sciknoweval_chemistry`` carry the authors' chat
(``messages``: their system prompt, the question with "A: text" options and "Please reason step by
step.") and are used as they are; other rows get this module's prompt.
"""

from __future__ import annotations

import re
import string
from typing import Any

from environments.answers import answer_or_none, strip_thinking
from environments.base import Environment, Task, Verdict
from environments.loaders import load_rows, require

_ANSWER = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
INSTRUCTIONS = "Think about the question, then give the letter of the correct option inside <answer></answer>, e.g. <answer>A</answer>."


def extract_answer(completion: str) -> str | None:
    """The last ``<answer>`` outside thinking, stripped; None when there is none or it is empty."""
    found = _ANSWER.findall(strip_thinking(completion))
    return answer_or_none(found[-1]) if found else None


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


def answer_key(row: dict[str, Any], where: str) -> str:
    """The right letter: ``answerKey`` when set, else ``answer``; never empty."""
    for key in ("answerKey", "answer"):
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    raise ValueError(f"{where}: no answer letter ('answerKey' and 'answer' are both missing or empty; "
                     f"fields: {sorted(row)})")


class MCQ(Environment):
    """``dataset``: ``"sample"``, a local file, or a hub name (e.g. ``hicai-zju/SciKnowEval``);
    ``domain`` / ``level`` / ``types`` keep only matching rows (SciKnowEval's ``domain``,
    ``details.level`` and ``type``, e.g. ``types: [mcq-4-choices, mcq-2-choices]``).
    Rows: ``question``, ``choices``, ``answerKey`` (or ``answer``), or prepared rows with
    ``messages`` and ``answer``."""

    def __init__(self, dataset: str = "sample", config: str | None = None, domain: str | None = None,
                 level: str | None = None, limit_per_split: int | None = None, splits: dict[str, str] | None = None,
                 types: list[str] | None = None):
        self.dataset, self.config, self.domain, self.level, self.types = dataset, config, domain, level, types
        self.limit, self.splits = limit_per_split, splits or {}

    def tasks(self, split: str) -> list[Task]:
        rows = load_rows(self.dataset, self.splits.get(split, split), config=self.config, sample="mcq_sample.jsonl")
        if self.domain:
            rows = [r for r in rows if str(r.get("domain", "")).lower() == self.domain.lower()]
        if self.level:
            rows = [r for r in rows if str((r.get("details") or {}).get("level", r.get("level", ""))) == self.level]
        if self.types:
            rows = [r for r in rows if r.get("type") in self.types]
        return [self.task_from_row(row, f"{split}-{i}") for i, row in enumerate(rows[: self.limit])]

    @staticmethod
    def task_from_row(row: dict[str, Any], default_id: str) -> Task:
        where = f"mcq dataset row {default_id}"
        answer = answer_key(row, where)
        if "messages" in row:
            messages = [dict(m) for m in row["messages"]]
            labels = row.get("labels")
        else:
            options = options_of(row, where)
            labels = [letter for letter, _ in options]
            text = "\n".join(f"{letter}. {text}" for letter, text in options)
            messages = [{"role": "user", "content": f"{require(row, 'question', where)}\n\n{text}\n\n{INSTRUCTIONS}"}]
        if labels is not None and answer not in labels:
            raise ValueError(f"{where}: answer {answer!r} is not one of the options {labels} "
                             "(a 'filling' or open question? keep only multiple-choice rows, e.g. types: [mcq-4-choices, mcq-2-choices])")
        return Task(id=str(row.get("id", default_id)), messages=messages, data={"answer": answer},
                    demonstration=row.get("demonstration"))

    def verify(self, task: Task, completion: str) -> Verdict:
        got = extract_answer(completion)
        return Verdict(reward=float(got is not None and got == task.data["answer"]), info={"extracted": got})
