"""Code generation, LiveCodeBench style (SPEC section 7): the longest fenced code block of the
completion runs on stdin/stdout tests or functional (call-based) tests, each with a CPU-time limit,
in the sandbox; reward 1 iff every test passes (``partial_credit=True``: the fraction passed).

Feedback is judge-like text, none on success: "Runtime Error" with the exception and the last input,
"Time Limit Exceeded" with the input, "Incorrect Format" when there is no code, a truncation notice
when the answer was cut off, or "Wrong Answer" with up to two shortest failing cases. Every field is
cut at 250 characters and the whole at 2000.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import zlib
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from environments.base import Environment, Task, Verdict
from environments.loaders import load_rows
from environments.sandbox import (
    SandboxLimits,
    level_for_untrusted_code,
    python_argv,
    run_sandboxed,
)

FIELD_CHARS = 250
FEEDBACK_CHARS = 2000
HARNESS_SOURCE = (Path(__file__).parent / "code_harness.py").read_text()
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", flags=re.DOTALL)

STDIN_INSTRUCTIONS = (
    "Read the inputs from stdin, solve the problem and write the answer to stdout (do not directly test on the "
    "sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```"
)
CALL_INSTRUCTIONS = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters.\n```python\n{starter_code}\n```"
)


def extract_code(completion: str) -> tuple[str | None, bool]:
    """(longest closed fenced block or None, whether an unclosed fence suggests truncation)."""
    blocks = _FENCE.findall(completion)
    unclosed = completion.count("```") % 2 == 1
    if not blocks:
        return None, unclosed
    return max(blocks, key=len), unclosed


def cut(text: str, limit: int = FIELD_CHARS) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= limit else text[:limit] + "... (truncated)"


def outputs_match(output: str, expected: str, kind: str) -> bool:
    if kind == "call":
        try:
            return json.loads(output) == json.loads(expected)
        except (json.JSONDecodeError, ValueError):
            return False
    got, want = _lines(output), _lines(expected)
    if got == want:
        return True
    if len(got) != len(want):
        return False
    return all(_tokens_equal(g, w) for g, w in zip(got, want))


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.strip().split("\n")]
    return [line for line in lines if line]


def _tokens_equal(got: str, want: str) -> bool:
    # Judges accept 1.0 for 1 and "3.50" for 3.5: compare whitespace tokens as decimals when both parse.
    a, b = got.split(), want.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            if Decimal(x) != Decimal(y):
                return False
        except InvalidOperation:
            return False
    return True


def judge_feedback(results: list[dict], tests: list[dict], kind: str, truncated: bool) -> str:
    """The judge's verdict text for a failed run (SPEC section 7)."""
    notice = ("Your answer was truncated: the code block was not closed before the response ended, "
              "so the last complete code block was judged.\n") if truncated else ""
    for result, test in zip(results, tests):
        if result["status"] == "runtime_error":
            text = f"Runtime Error\n{cut(result['error'] or 'the program exited with an error')}\nLast input:\n{cut(test['input'])}"
            return (notice + text)[:FEEDBACK_CHARS]
        if result["status"] == "timeout":
            return (notice + f"Time Limit Exceeded\nInput:\n{cut(test['input'])}")[:FEEDBACK_CHARS]
        if result["status"] == "output_limit":
            return (notice + f"Output Limit Exceeded\nInput:\n{cut(test['input'])}")[:FEEDBACK_CHARS]
    failing = [(r, t) for r, t in zip(results, tests) if not outputs_match(r["output"], t["output"], kind)]
    failing.sort(key=lambda pair: len(pair[1]["input"]) + len(pair[1]["output"]))
    cases = [f"Input:\n{cut(t['input'])}\nOutput:\n{cut(r['output'])}\nExpected:\n{cut(t['output'])}" for r, t in failing[:2]]
    return (notice + "Wrong Answer\n" + "\n\n".join(cases))[:FEEDBACK_CHARS]


class Code(Environment):
    """``dataset``: ``"sample"`` (bundled, offline), a local .json/.jsonl/.parquet file, or a hub name
    such as ``livecodebench/code_generation_lite`` (``config`` picks the release, e.g. ``release_v6``).
    Rows are either this package's form (``question``, ``tests: [{input, output}]``, ``kind``
    ``stdin``|``call``, ``fn_name``, ``starter_code``) or LiveCodeBench's own columns."""

    def __init__(self, dataset: str = "sample", config: str | None = None, limit_per_split: int | None = None,
                 time_limit_s: float = 6.0, memory_mib: int = 1024, partial_credit: bool = False,
                 max_tests: int | None = None, sandbox_level: str = "auto", splits: dict[str, str] | None = None,
                 concurrency: int = 1):
        # Verification waits on sandboxed processes: a worker may run several at once (one per core).
        self.max_concurrency = concurrency
        self.dataset, self.config, self.limit = dataset, config, limit_per_split
        self.time_limit_s, self.memory_mib = time_limit_s, memory_mib
        self.partial_credit, self.max_tests, self.sandbox_level = partial_credit, max_tests, sandbox_level
        self.splits = splits or {}  # our split name -> the dataset's, e.g. {"train": "test"} for LCB

    def tasks(self, split: str) -> list[Task]:
        rows = load_rows(self.dataset, self.splits.get(split, split), config=self.config, sample="code_sample.jsonl",
                         limit=self.limit)
        return [self.task_from_row(row, f"{split}-{i}") for i, row in enumerate(rows)]

    def task_from_row(self, row: dict[str, Any], default_id: str) -> Task:
        if "question_content" in row:
            row = from_livecodebench(row)
        for key in ("question", "tests"):
            if key not in row:
                raise ValueError(f"code dataset row {default_id}: no {key!r} field (fields: {sorted(row)})")
        kind = row.get("kind", "stdin")
        if kind not in ("stdin", "call"):
            raise ValueError(f"code dataset row {default_id}: kind must be 'stdin' or 'call', got {kind!r}")
        if kind == "call" and not row.get("fn_name"):
            raise ValueError(f"code dataset row {default_id}: call-based tests need 'fn_name'")
        instructions = CALL_INSTRUCTIONS.format(starter_code=row.get("starter_code", "")) if kind == "call" else STDIN_INSTRUCTIONS
        content = f"{row['question']}\n\n{instructions}"
        data = {"tests": row["tests"][: self.max_tests], "kind": kind, "fn_name": row.get("fn_name"),
                "time_limit_s": float(row.get("time_limit_s", self.time_limit_s))}
        return Task(id=str(row.get("id", default_id)), messages=[{"role": "user", "content": content}], data=data,
                    demonstration=row.get("demonstration"))

    def verify(self, task: Task, completion: str) -> Verdict:
        code, truncated = extract_code(completion)
        if code is None:
            text = "Incorrect Format\nPut your solution in a fenced code block: ```python ... ```."
            if truncated:
                text = "Your answer was truncated before the code block was closed.\n" + text
            return Verdict(reward=0.0, feedback=text, info={"status": "format"})
        tests, kind, limit_s = task.data["tests"], task.data["kind"], task.data["time_limit_s"]
        results = run_tests(code, tests, kind, task.data.get("fn_name"), limit_s, self.memory_mib,
                            stop_early=not self.partial_credit, level=self.sandbox_level)
        passed = sum(r["status"] == "ok" and outputs_match(r["output"], t["output"], kind) for r, t in zip(results, tests))
        info = {"passed": passed, "tests": len(tests)}
        if passed == len(tests):
            return Verdict(reward=1.0, info=info)
        reward = passed / len(tests) if self.partial_credit else 0.0
        return Verdict(reward=reward, feedback=judge_feedback(results, tests, kind, truncated), info=info)


def run_tests(code: str, tests: list[dict], kind: str, fn_name: str | None, time_limit_s: float, memory_mib: int,
              stop_early: bool, level: str = "auto", output_bytes_per_test: int = 1 << 20) -> list[dict]:
    """One sandbox run for all tests of a task; a result per test that ran, in order. A harness
    that dies (the program killed it) leaves the untested cases as runtime errors."""
    spec = {"kind": kind, "fn_name": fn_name, "inputs": [t["input"] for t in tests], "time_limit_s": time_limit_s,
            "output_bytes": output_bytes_per_test, "stop_early": stop_early}
    spec_json = json.dumps(spec)
    limits = SandboxLimits(
        wall_s=len(tests) * (3 * time_limit_s + 1.5) + 5, cpu_s=len(tests) * (time_limit_s + 1) + 5,
        memory_mib=memory_mib, file_mib=max(16, len(spec_json) >> 19), output_bytes=len(tests) * (output_bytes_per_test + 4096) + 65536,
        workdir_mib=max(16, 2 * (len(spec_json) >> 20) + 8), tmp_mib=max(16, len(tests) * (output_bytes_per_test >> 20) + 8),
    )
    result = run_sandboxed(python_argv("harness.py"), files={"harness.py": HARNESS_SOURCE, "solution.py": code,
                                                            "tests.json": spec_json}, limits=limits,
                           level=level_for_untrusted_code(level))
    try:
        results = json.loads(result.stdout) if result.ok else None
    except json.JSONDecodeError:
        results = None
    if not isinstance(results, list):
        why = result.describe() if not result.ok else "the judge's output was unreadable"
        return [{"status": "runtime_error", "output": "", "error": f"the program broke the judge ({why})"}]
    return results


def from_livecodebench(row: dict[str, Any]) -> dict[str, Any]:
    """LiveCodeBench's columns -> this module's row form. Its private tests are stored as
    base64(zlib(pickle(json))): pickle is only unpacked from the dataset, never from completions."""
    public = json.loads(row["public_test_cases"]) if isinstance(row["public_test_cases"], str) else row["public_test_cases"]
    private = row.get("private_test_cases") or []
    if isinstance(private, str):
        try:
            private = json.loads(private)
        except json.JSONDecodeError:
            private = json.loads(pickle.loads(zlib.decompress(base64.b64decode(private.encode()))))
    tests = list(public) + list(private)
    kind = "call" if tests and tests[0].get("testtype") == "functional" else "stdin"
    metadata = row.get("metadata") or "{}"
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    return {"id": row.get("question_id"), "question": row["question_content"], "starter_code": row.get("starter_code", ""),
            "kind": kind, "fn_name": metadata.get("func_name"),
            "tests": [{"input": t["input"], "output": t["output"]} for t in tests]}
