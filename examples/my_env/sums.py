"""A user environment that lives outside the sdpo package: sums read from a JSONL file, checked by
an async verifier that explains what went wrong, and a group hook that tells each failure how its
siblings did. Train on it with

    python -m sdpo.run recipes/quickstart.yaml \
        environment.name=examples/my_env/sums.py:Sums \
        "environment.kwargs={path: examples/my_env/sums.jsonl}"

(``path/to/file.py:Class`` imports a file from anywhere; ``my_pkg.module:Class`` works for anything on
the Python path). It speaks the embedded tiny model's language: the prompt is ``a+b``.
"""

from __future__ import annotations

import json
from pathlib import Path

from environments import Environment, Task, Verdict


class Sums(Environment):
    def __init__(self, path: str, test_fraction: float = 0.25, hints: bool = True):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{path} holds no rows")
        cut = max(1, int(len(rows) * test_fraction))
        self.splits = {"test": rows[:cut], "train": rows[cut:]}
        self.hints = hints

    def tasks(self, split: str) -> list[Task]:
        if split not in self.splits:
            raise ValueError(f"Sums has splits {sorted(self.splits)}, not {split!r}")
        return [Task(id=f"{split}-{i}", messages=[{"role": "user", "content": row["question"]}],
                     data={"answer": str(row["answer"])}) for i, row in enumerate(self.splits[split])]

    async def verify(self, task: Task, completion: str) -> Verdict:
        # async: a real verifier might call a service here; the pool runs many at once.
        got, want = completion.strip(), task.data["answer"]
        if got == want:
            return Verdict(reward=1.0)
        if not got.lstrip("-").isdigit():
            return Verdict(reward=0.0, feedback=f"{got!r} is not a number." if self.hints else None)
        off = int(got) - int(want)
        return Verdict(reward=0.0, feedback=f"{got} is off by {off:+d}." if self.hints else None, info={"off_by": off})

    def review_group(self, task: Task, completions: list[str], verdicts: list[Verdict]) -> list[Verdict]:
        solved = sum(v.reward >= 1.0 for v in verdicts)
        if not self.hints or solved == 0:
            return verdicts
        return [v if v.reward >= 1.0 or not v.feedback else
                Verdict(v.reward, f"{v.feedback} {solved} of {len(verdicts)} attempts got it right.", v.info)
                for v in verdicts]
