"""LiveCodeBench v6 as the authors prepared it (lasgroup/SDPO data/utils/livecodebench.py,
data/format/code.py, data/format/prompts.py, data/split_tests.py, data/preprocess.py).

Source: ``livecodebench/code_generation_lite`` is a loading script on its main branch, which
``datasets`` 4 refuses (and 3.x runs only with trust_remote_code); the authors read the data files
of revision ``refs/pr/6`` (split ``test``), which loads without a script. Offline, pass the
release's JSONL files (a directory holding test.jsonl ... test6.jsonl, read in that order, or one
file).

Kept: 2025-02-01 <= contest_date < 2025-05-01. The prompt is the authors' CODE_PROMPT around the
statement, with "Your solution should have the following signature" and the starter code's ``def``
line for LeetCode problems, ``(self, `` removed everywhere in the prompt (their preprocess.py):
the model writes a plain function. Tests: the private tests only (the public ones are the examples
in the statement), 6 s each. Both files hold the same problems; ``test.jsonl`` is scored on every
private test, ``train.jsonl`` (training reward and feedback) on a seeded 50%: ``numpy.random.seed(0)``
then, problem by problem in dataset order, ``choice(n, max(1, int(n / 2)), replace=False)`` sorted,
as split_tests.py draws it. The private tests stay encoded in the files (``test_indices`` names the
subset); the judge decodes them when it verifies.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from environments.code import decode_private_tests, livecodebench_fn_name, livecodebench_kind
from environments.prepare.common import is_local, iter_hub, iter_local, write_jsonl, write_manifest

HUB_NAME = "livecodebench/code_generation_lite"
HUB_REVISION = "refs/pr/6"  # the authors' pin: the data files without the loading script
START, END = datetime(2025, 2, 1), datetime(2025, 5, 1)
TRAIN_TEST_FRACTION, TEST_SPLIT_SEED = 0.5, 0
TIME_LIMIT_S = 6.0
RELEASE_FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")
# The authors' code prompt (data/format/prompts.py), to the character. Its "1 second" is their
# text; the judge's limit is TIME_LIMIT_S, as in their tests.
CODE_PROMPT = (
    "You are a coding expert. You will be given a coding problem, and you need to write a correct Python program "
    "that matches the specification and passes all tests. The time limit is 1 second. You may start by outlining "
    "your thought process. In the end, please provide the complete code in a code block enclosed with ``` ```.\n\n{problem}"
)


def contest_date(row: dict[str, Any]) -> datetime:
    value = row.get("contest_date")
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "")).replace(tzinfo=None)
    raise ValueError(f"LiveCodeBench row {row.get('question_id')!r}: no contest_date")


def signature(starter_code: str) -> str:
    """The ``def`` line of the starter code, as the authors cut it."""
    return "def " + starter_code.split("def ", 1)[1].split("Input\n")[0].strip()


def prompt_text(row: dict[str, Any]) -> str:
    problem = row["question_content"]
    starter = row.get("starter_code") or ""
    if starter.strip():
        problem += f"\n\nYour solution should have the following signature: ```python\n{signature(starter)}\n```"
    return CODE_PROMPT.format(problem=problem).replace("(self, ", "(")


def source_rows(source: str | None, revision: str | None) -> Iterable[dict[str, Any]]:
    if source and is_local(source):
        path = Path(source)
        if path.is_dir():
            files = [path / name for name in RELEASE_FILES if (path / name).is_file()]
            if not files:
                raise ValueError(f"{path} holds none of LiveCodeBench's files {RELEASE_FILES}")
            return (row for file in files for row in iter_local(file))
        return iter_local(path)
    return iter_hub(source or HUB_NAME, "test", revision=revision or HUB_REVISION)


def prepare(out_dir: Path, source: str | None = None, revision: str | None = None) -> dict[str, Any]:
    import numpy as np  # comes with `datasets`

    rng = np.random.RandomState(TEST_SPLIT_SEED)  # what numpy.random.seed(0) seeds
    train_rows, test_rows, tests_total, tests_train = [], [], 0, 0
    for row in source_rows(source, revision):
        if not START <= contest_date(row) < END:
            continue
        encoded = row.get("private_test_cases")
        count = len(decode_private_tests(encoded)) if encoded else 0
        if count == 0:
            raise ValueError(f"LiveCodeBench problem {row.get('question_id')!r} has no private tests")
        keep = max(1, int(count * TRAIN_TEST_FRACTION))
        indices = sorted(int(i) for i in rng.choice(count, size=keep, replace=False))
        kind = livecodebench_kind(row)
        base = {"id": str(row["question_id"]), "question_title": row.get("question_title"),
                "platform": row.get("platform"), "difficulty": row.get("difficulty"),
                "contest_date": contest_date(row).isoformat(),
                "messages": [{"role": "user", "content": prompt_text(row)}],
                "kind": kind, "fn_name": livecodebench_fn_name(row) if kind == "call" else None,
                "time_limit_s": TIME_LIMIT_S, "private_test_cases": encoded}
        test_rows.append(base)
        train_rows.append({**base, "test_indices": indices})
        tests_total += count
        tests_train += keep
    if not test_rows:
        raise ValueError(f"no LiveCodeBench problem with {START.date()} <= contest_date < {END.date()} in the source")
    counts = {"train": write_jsonl(out_dir / "train.jsonl", train_rows), "test": write_jsonl(out_dir / "test.jsonl", test_rows)}
    write_manifest(out_dir, "livecodebench_v6", {
        "source": source or HUB_NAME, "revision": None if source and is_local(source) else (revision or HUB_REVISION),
        "filters": {"contest_date_from": START, "contest_date_before": END},
        "tests": {"train_fraction": TRAIN_TEST_FRACTION, "seed": TEST_SPLIT_SEED, "private_tests": tests_total,
                  "train_private_tests": tests_train, "time_limit_s": TIME_LIMIT_S},
        "rows": counts})
    return counts
