"""Code generation, LiveCodeBench style (SPEC section 7): the longest fenced code block of the
completion runs on stdin/stdout tests or functional (call-based) tests, each with a CPU-time limit,
in the sandbox; reward 1 iff every test passes (``partial_credit=True``: the fraction passed).

Feedback is judge-like text, none on success: "Runtime Error" with the exception and the last input,
"Time Limit Exceeded" with the input, "Incorrect Format" when there is no code, a truncation notice
when the answer was cut off, or "Wrong Answer" with up to two shortest failing cases. Every field is
cut at 250 characters and the whole at 2000.

As LiveCodeBench's official harness (lcb_runner/evaluation/testing_util.py) does, the program runs
after its import preamble (``from typing import *``, ``from collections import *``... and
``sys.setrecursionlimit(50000)``), so a correct solution that writes ``List[int]`` without importing
it passes; annotations are postponed (``from __future__ import annotations``, as the SDPO authors'
judge compiles call-based solutions), so an annotation naming a type defined later does not fail.
The preamble is one line, and reported line numbers are shifted back to the solution's own.

Code written while thinking (``<think>...</think>``) is never judged, and an empty code block is no
code. LiveCodeBench's private tests (base64(zlib(pickle(json)))), several MB a problem, stay encoded
in the task and are decoded when a completion is verified (a few recent problems cached per worker);
a task may name the subset of them it is scored on (``test_indices``: the authors' seeded 50% for
training reward and feedback; evaluation uses all).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import threading
import zlib
from collections import OrderedDict
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from environments.answers import answer_or_none, strip_thinking
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
_FUTURE = re.compile(r"^[ \t]*from[ \t]+__future__[ \t]+import[^\n]*$", flags=re.MULTILINE)
_ERROR_LINE = re.compile(r"(solution\.py, line |\(line )(\d+)\)")
# LiveCodeBench's import preamble (lcb_runner/evaluation/testing_util.py, `import_string`), as one
# line so that the solution's line numbers move by exactly PREAMBLE_LINES.
LCB_IMPORTS = (
    "from string import *", "from re import *", "from datetime import *", "from collections import *",
    "from heapq import *", "from bisect import *", "from copy import *", "from math import *", "from random import *",
    "from statistics import *", "from itertools import *", "from functools import *", "from operator import *",
    "from io import *", "from sys import *", "from json import *", "from builtins import *", "from typing import *",
    "import string", "import re", "import datetime", "import collections", "import heapq", "import bisect",
    "import copy", "import math", "import random", "import statistics", "import itertools", "import functools",
    "import operator", "import io", "import sys", "import json", "sys.setrecursionlimit(50000)",
)
PREAMBLE_LINES = 1
DECODED_CACHE_TASKS = 4  # decoded private tests kept per worker (they can be hundreds of MB a problem)

STDIN_INSTRUCTIONS = (
    "Read the inputs from stdin, solve the problem and write the answer to stdout (do not directly test on the "
    "sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```"
)
CALL_INSTRUCTIONS = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters.\n```python\n{starter_code}\n```"
)


def extract_code(completion: str) -> tuple[str | None, bool]:
    """(longest closed fenced block outside thinking, or None when there is none or it is blank;
    whether an unclosed fence suggests truncation)."""
    text = strip_thinking(completion)
    blocks = _FENCE.findall(text)
    unclosed = text.count("```") % 2 == 1
    if not blocks:
        return None, unclosed
    code = max(blocks, key=len)
    return (code if answer_or_none(code) else None), unclosed


def program_source(code: str) -> str:
    """The file the judge runs: the preamble line (postponed annotations, the solution's own
    ``__future__`` imports, LiveCodeBench's imports), then the solution with its line numbers kept
    but for that one line."""
    futures = ["from __future__ import annotations"] + [m.strip() for m in _FUTURE.findall(code)]
    body = _FUTURE.sub("", code)  # a future import must come first: hoisted, its line left blank
    return "; ".join(futures + list(LCB_IMPORTS)) + "\n" + body


def solution_line_numbers(error: str) -> str:
    """An error message with the program's line numbers turned back into the solution's."""
    return _ERROR_LINE.sub(lambda m: f"{m.group(1)}{max(1, int(m.group(2)) - PREAMBLE_LINES)})", error)


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
            error = solution_line_numbers(result["error"] or "the program exited with an error")
            text = f"Runtime Error\n{cut(error)}\nLast input:\n{cut(test['input'])}"
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
    """``dataset``: ``"sample"`` (bundled, offline), or a local .json/.jsonl/.parquet file: this
    package's rows (``question``, ``tests: [{input, output}]``, ``kind`` ``stdin``|``call``,
    ``fn_name``, ``starter_code``), rows prepared by ``python -m sdpo.data prepare livecodebench_v6``
    (``messages``, ``kind``, ``fn_name``, ``private_test_cases`` still encoded, ``test_indices``), or
    LiveCodeBench's own columns (public and private tests, the official evaluation's set). The hub
    repository ``livecodebench/code_generation_lite`` is a loading script that ``datasets`` 4 refuses:
    prepare it instead."""

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
        self._decoded: OrderedDict[str, list[dict]] = OrderedDict()
        self._decoded_lock = threading.Lock()  # verify runs on several threads of one worker

    def tasks(self, split: str) -> list[Task]:
        if self.dataset.startswith("livecodebench/"):
            raise ValueError(f"dataset {self.dataset!r} is a loading script on the hub, which `datasets` 4 refuses; "
                             "run `python -m sdpo.data prepare livecodebench_v6 --out DIR` (its data files at a "
                             "pinned revision) and set dataset: DIR/{split}.jsonl")
        rows = load_rows(self.dataset, self.splits.get(split, split), config=self.config, sample="code_sample.jsonl",
                         limit=self.limit)
        return [self.task_from_row(row, f"{split}-{i}") for i, row in enumerate(rows)]

    def task_from_row(self, row: dict[str, Any], default_id: str) -> Task:
        where = f"code dataset row {default_id}"
        if "question_content" in row:
            row = from_livecodebench(row)
        if "messages" not in row and "question" not in row:
            raise ValueError(f"{where}: no 'question' (or 'messages') field (fields: {sorted(row)})")
        if not row.get("tests") and not row.get("private_test_cases"):
            raise ValueError(f"{where}: no tests ('tests' or 'private_test_cases'); every completion would pass")
        kind = row.get("kind", "stdin")
        if kind not in ("stdin", "call"):
            raise ValueError(f"{where}: kind must be 'stdin' or 'call', got {kind!r}")
        if kind == "call" and not row.get("fn_name"):
            raise ValueError(f"{where}: call-based tests need 'fn_name'")
        if "messages" in row:
            messages = [dict(m) for m in row["messages"]]
        else:
            instructions = CALL_INSTRUCTIONS.format(starter_code=row.get("starter_code", "")) if kind == "call" else STDIN_INSTRUCTIONS
            messages = [{"role": "user", "content": f"{row['question']}\n\n{instructions}"}]
        data = {"tests": list(row.get("tests") or []), "encoded_tests": row.get("private_test_cases") or None,
                "test_indices": row.get("test_indices"), "kind": kind, "fn_name": row.get("fn_name"),
                "time_limit_s": float(row.get("time_limit_s", self.time_limit_s))}
        return Task(id=str(row.get("id", default_id)), messages=messages, data=data, demonstration=row.get("demonstration"))

    def tests_of(self, task: Task) -> list[dict]:
        """The task's tests: its plain ones, then its encoded private ones (decoded now, cached per
        worker), restricted to ``test_indices`` when given, cut to ``max_tests``."""
        tests = list(task.data.get("tests") or [])
        encoded = task.data.get("encoded_tests")
        if encoded:
            key = f"{task.id}:{len(encoded)}:{encoded[:64]}"
            with self._decoded_lock:
                private = self._decoded.get(key)
                if private is not None:
                    self._decoded.move_to_end(key)
            if private is None:
                private = decode_private_tests(encoded)
                with self._decoded_lock:
                    self._decoded[key] = private
                    while len(self._decoded) > DECODED_CACHE_TASKS:
                        self._decoded.popitem(last=False)
            indices = task.data.get("test_indices")
            tests += [private[i] for i in indices] if indices is not None else private
        return tests[: self.max_tests]

    def verify(self, task: Task, completion: str) -> Verdict:
        code, truncated = extract_code(completion)
        if code is None:
            text = "Incorrect Format\nPut your solution in a fenced code block: ```python ... ```."
            if truncated:
                text = "Your answer was truncated before the code block was closed.\n" + text
            return Verdict(reward=0.0, feedback=text, info={"status": "format"})
        tests, kind, limit_s = self.tests_of(task), task.data["kind"], task.data["time_limit_s"]
        if not tests:
            return Verdict(reward=0.0, info={"status": "no_tests"})
        results = run_tests(program_source(code), tests, kind, task.data.get("fn_name"), limit_s, self.memory_mib,
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


class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench pickles a JSON string: no class may be loaded, so a crafted dataset cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"private tests may only pickle a string, not {module}.{name}")


def decode_private_tests(encoded: str | list) -> list[dict]:
    """LiveCodeBench's ``private_test_cases`` (plain JSON in early releases, else
    base64(zlib(pickle(json string)))) -> [{input, output}]."""
    if isinstance(encoded, list):
        tests = encoded
    else:
        try:
            tests = json.loads(encoded)
        except json.JSONDecodeError:
            text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(encoded.encode())))).load()
            tests = json.loads(text)
    return [{"input": t["input"], "output": t["output"]} for t in tests]


def livecodebench_kind(row: dict[str, Any]) -> str:
    """"call" (LeetCode functional tests) or "stdin", from the first public test's ``testtype``."""
    public = row.get("public_test_cases") or "[]"
    public = json.loads(public) if isinstance(public, str) else public
    return "call" if public and public[0].get("testtype") == "functional" else "stdin"


def livecodebench_fn_name(row: dict[str, Any]) -> str | None:
    metadata = row.get("metadata") or "{}"
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    return metadata.get("func_name") or None


def from_livecodebench(row: dict[str, Any]) -> dict[str, Any]:
    """LiveCodeBench's columns -> this module's row form: the public tests decoded, the private ones
    left encoded for ``tests_of``."""
    public = row.get("public_test_cases") or "[]"
    public = json.loads(public) if isinstance(public, str) else public
    return {"id": row.get("question_id"), "question": row["question_content"], "starter_code": row.get("starter_code", ""),
            "kind": livecodebench_kind(row), "fn_name": livecodebench_fn_name(row),
            "tests": [{"input": t["input"], "output": t["output"]} for t in public],
            "private_test_cases": row.get("private_test_cases") or None}
