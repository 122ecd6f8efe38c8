"""Math with a final answer (GSM8K / MATH style): the answer is the last ``\\boxed{...}`` or
``<answer>...</answer>`` of the completion, checked for mathematical equivalence with math-verify
(LaTeX, fractions, decimals, sets, intervals). Feedback is optional and off by default (SPEC §7).
Thinking is never judged and an empty answer (``\\boxed{}``) never earns reward (environments/answers.py).

Rows prepared by ``python -m sdpo.data prepare gsm8k`` carry the authors' prompt (``messages``) and
the final number (``answer``) and are used as they are.
"""

from __future__ import annotations

import re
from typing import Any

from environments.answers import answer_or_none, strip_thinking
from environments.base import Environment, Task, Verdict
from environments.loaders import load_rows, require

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
INSTRUCTIONS = "Solve the problem step by step. Put the final answer in \\boxed{}."


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else None


def extract_answer(completion: str) -> str | None:
    """The last box (else the last ``<answer>`` tag) outside thinking; None when missing or empty."""
    text = strip_thinking(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        return answer_or_none(boxed)
    tags = _ANSWER_TAG.findall(text)
    return answer_or_none(tags[-1]) if tags else None


def equivalent(answer: str, gold: str) -> bool:
    from math_verify import parse, verify  # lazily: sympy is slow to import

    # Timeouts off: math-verify's own use SIGALRM, which only works on the main thread; the verifier
    # pool bounds every call with its per-call deadline instead.
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    got_parsed = parse(f"${answer}$", parsing_timeout=None)
    if not gold_parsed or not got_parsed:
        return answer.strip() == gold.strip()
    return bool(verify(gold_parsed, got_parsed, timeout_seconds=None))


def gsm8k_answer(solution: str) -> str:
    # GSM8K solutions end with "#### 42"; commas are thousands separators.
    answer = solution.rsplit("####", 1)[-1].strip().replace(",", "")
    if not answer:
        raise ValueError(f"GSM8K solution has nothing after '####': {solution[-80:]!r}")
    return answer


class Math(Environment):
    """``dataset``: ``"sample"``, a local file or a hub name (``openai/gsm8k`` with ``config: main``,
    ``HuggingFaceH4/MATH-500``...). Rows: ``problem`` (or ``question``) and ``answer``; a GSM8K
    answer with ``####`` is reduced to its final number, a MATH ``solution`` to its last box."""

    def __init__(self, dataset: str = "sample", config: str | None = None, limit_per_split: int | None = None,
                 feedback: bool = False, splits: dict[str, str] | None = None):
        self.dataset, self.config, self.limit, self.feedback, self.splits = dataset, config, limit_per_split, feedback, splits or {}

    def tasks(self, split: str) -> list[Task]:
        rows = load_rows(self.dataset, self.splits.get(split, split), config=self.config, sample="math_sample.jsonl",
                         limit=self.limit)
        return [self.task_from_row(row, f"{split}-{i}") for i, row in enumerate(rows)]

    @staticmethod
    def task_from_row(row: dict[str, Any], default_id: str) -> Task:
        where = f"math dataset row {default_id}"
        problem = row.get("problem", row.get("question"))
        if problem is None and "messages" not in row:
            raise ValueError(f"{where}: no 'problem' (or 'question') field (fields: {sorted(row)})")
        if "answer" in row:
            answer = str(row["answer"])
            answer = gsm8k_answer(answer) if "####" in answer else answer.strip()
            if not answer:
                raise ValueError(f"{where}: 'answer' is empty")
        else:
            answer = last_boxed(str(require(row, "solution", where)))
            if answer is None:
                raise ValueError(f"{where}: no 'answer' field and no \\boxed{{}} in 'solution'")
        messages = ([dict(m) for m in row["messages"]] if "messages" in row
                    else [{"role": "user", "content": f"{problem}\n\n{INSTRUCTIONS}"}])
        return Task(id=str(row.get("id", row.get("unique_id", default_id))), messages=messages,
                    data={"answer": answer}, demonstration=row.get("demonstration"))

    def verify(self, task: Task, completion: str) -> Verdict:
        got = extract_answer(completion)
        if got is None:
            return Verdict(0.0, "No final answer found: put it in \\boxed{}." if self.feedback else None, {"extracted": None})
        ok = equivalent(got, task.data["answer"])
        feedback = None if ok or not self.feedback else f"The final answer {got} is not correct."
        return Verdict(float(ok), feedback, {"extracted": got})
