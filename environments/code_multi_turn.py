"""Code with a test runner: the model may run its program on the public tests before it submits.

The multi-turn form of environments/code.py (same tasks, sandbox and judge). The model has one tool,
``run_tests(code)``: the program runs on the task's public tests in the sandbox and the tool answers
with the judge's text for that run (how many passed; on a failure the judge's feedback: Wrong Answer
with the program's output and the expected one, Runtime Error with the exception, Time Limit
Exceeded, ...). A turn without a tool call is the submission: its fenced code block is judged on the
hidden tests by ``Code.verify``, whose verdict (reward and the judge's feedback for the teacher) is
the episode's. Only the hidden tests decide the reward.

Public and hidden tests: a task with private tests (LiveCodeBench) shows its public cases (``tests``)
and is scored on all of them, as single-turn Code scores it. A task with plain tests only (the bundled
sample, a user's rows) shows its first ``public_tests`` cases and is scored on all of them; with
``public_tests: 0`` the tool has nothing to run and says so.
"""

from __future__ import annotations

from typing import Any

from environments.base import Task
from environments.code import Code, extract_code, judge_feedback, outputs_match, program_source, run_tests
from environments.multi_turn import EpisodeState, MultiTurnEnvironment, function_tool

TOOL_INSTRUCTIONS = (
    "\n\nBefore you answer, you may call the run_tests tool with a complete program to run it on the public "
    "tests and see the judge's verdict. Your final answer, a message without a tool call, is judged on hidden tests."
)


class MultiTurnCode(MultiTurnEnvironment, Code):
    """``Code``'s keyword arguments (dataset, time_limit_s, memory_mib, partial_credit, ...) plus
    ``public_tests``: how many of a plain task's tests the tool runs (see the module docstring)."""

    tools = [function_tool("run_tests", "Run a Python program on the problem's public tests and get the judge's "
                           "verdict", code="string")]

    def __init__(self, *, public_tests: int = 1, **code_kwargs: Any):
        Code.__init__(self, **code_kwargs)
        self.public_tests = public_tests

    def tasks(self, split: str) -> list[Task]:
        tasks = Code.tasks(self, split)
        for task in tasks:
            last = task.messages[-1]
            task.messages[-1] = {**last, "content": last["content"] + TOOL_INSTRUCTIONS}
        return tasks

    def public_tests_of(self, task: Task) -> list[dict]:
        tests = list(task.data.get("tests") or [])
        return tests if task.data.get("encoded_tests") else tests[: self.public_tests]

    def call_tool(self, state: EpisodeState, name: str, arguments: dict[str, Any]) -> str:
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            return "run_tests needs the program as a non-empty string argument 'code'."
        if "```" in code:  # a fenced block inside the argument: run the block, as the judge would
            code = extract_code(code)[0] or ""
        task = state.task
        tests = self.public_tests_of(task)
        if not tests:
            return "This problem has no public tests to run."
        kind = task.data["kind"]
        # every public test runs (no early stop), so the count of passes is exact
        results = run_tests(program_source(code), tests, kind, task.data.get("fn_name"), task.data["time_limit_s"],
                            self.memory_mib, stop_early=False, level=self.sandbox_level)
        passed = sum(r["status"] == "ok" and outputs_match(r["output"], t["output"], kind) for r, t in zip(results, tests))
        counted = f"{passed} of {len(tests)} public test{'s' if len(tests) > 1 else ''}"
        if passed == len(tests):
            return f"Passed {counted}."
        return f"Passed {counted}.\n" + judge_feedback(results, tests, kind, truncated=False)
