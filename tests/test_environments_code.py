"""The code environment (SPEC section 7) end to end through the sandbox, offline on the bundled sample."""

import json

import pytest

from environments.code import FEEDBACK_CHARS, Code, extract_code, from_livecodebench, judge_feedback, outputs_match

pytestmark = pytest.mark.slow

ENV = Code(time_limit_s=1.0)
TASKS = {t.id: t for t in ENV.tasks("train")}


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def test_the_longest_fenced_block_is_judged_and_an_unclosed_fence_is_noticed():
    text = "```\nshort\n```\ntext\n```python\nthe longest block\n```\n```py\nmid block\n```"
    assert extract_code(text) == ("the longest block\n", False)
    assert extract_code("```python\nprint(1)\n```\n```python\nprint(") == ("print(1)\n", True)
    assert extract_code("no code") == (None, False)


@pytest.mark.parametrize("task_id", ["sum-two", "reverse-words", "count-primes", "two-sum", "max-subarray"])
def test_reference_solutions_pass_every_test(task_id):
    task = TASKS[task_id]
    verdict = ENV.verify(task, task.demonstration)
    assert (verdict.reward, verdict.feedback) == (1.0, None)
    assert verdict.info == {"passed": len(task.data["tests"]), "tests": len(task.data["tests"])}


def test_wrong_answer_shows_the_two_shortest_failing_cases():
    verdict = ENV.verify(TASKS["sum-two"], fenced("a, b = map(int, input().split())\nprint(a - b)"))
    assert verdict.reward == 0.0
    assert verdict.feedback == ("Wrong Answer\nInput:\n1 2\nOutput:\n-1\nExpected:\n3\n\n"
                                "Input:\n-5 5\nOutput:\n-10\nExpected:\n0")


def test_runtime_error_names_the_exception_and_the_last_input():
    verdict = ENV.verify(TASKS["reverse-words"], fenced("x = input()\nprint(x.split()[5])"))
    assert verdict.feedback == "Runtime Error\nIndexError: list index out of range (line 2)\nLast input:\nhello world"


def test_call_based_tests_and_their_failures():
    task = TASKS["two-sum"]
    wrong = ENV.verify(task, fenced("class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]"))
    assert wrong.reward == 0.0 and wrong.info["passed"] == 2
    assert wrong.feedback == "Wrong Answer\nInput:\n[3, 2, 4]\n6\nOutput:\n[0, 1]\nExpected:\n[1, 2]"
    missing = ENV.verify(task, fenced("def other(): pass"))
    assert missing.feedback.startswith("Runtime Error\nNameError: no function 'twoSum'")


@pytest.mark.parametrize("code, expected", [
    ("while True: pass", "Time Limit Exceeded\nInput:\n1 2"),
    ("import time; time.sleep(30)", "Time Limit Exceeded\nInput:\n1 2"),
    ("print(open('/etc/shadow').read())", "Runtime Error\nFileNotFoundError"),
    ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)", "Runtime Error\nOSError"),
    ("while True: print('x' * 100000)", "Output Limit Exceeded\nInput:\n1 2"),
    ("x = bytearray(1 << 34)", "Runtime Error\nMemoryError"),
    ("import os, signal; os.kill(os.getppid(), signal.SIGKILL)", "Runtime Error\nthe program broke the judge"),
])
def test_hostile_or_broken_programs_get_judge_feedback(code, expected):
    verdict = ENV.verify(TASKS["sum-two"], fenced(code))
    assert verdict.reward == 0.0 and verdict.feedback.startswith(expected), verdict.feedback


def test_format_and_truncation_notices():
    assert ENV.verify(TASKS["sum-two"], "print(3)").feedback.startswith("Incorrect Format")
    truncated = ENV.verify(TASKS["sum-two"], "```python\nprint(3)\n```\nBetter:\n```python\nimport sys\nprint(sum(map(int")
    assert truncated.feedback.startswith("Your answer was truncated") and "Wrong Answer" in truncated.feedback


def test_fields_are_cut_at_250_and_the_whole_at_2000():
    tests = [{"input": "i" * 1000 + str(k), "output": "o" * 1000} for k in range(3)]
    results = [{"status": "ok", "output": "w" * 1000, "error": ""}] * 3
    text = judge_feedback(results, tests, "stdin", truncated=False)
    assert "i" * 250 + "... (truncated)" in text and "i" * 251 not in text and "o" * 251 not in text
    assert len(judge_feedback(results, tests * 10, "stdin", True)) <= FEEDBACK_CHARS
    error = judge_feedback([{"status": "runtime_error", "output": "", "error": "E" * 5000}], tests, "stdin", False)
    assert "E" * 250 + "... (truncated)" in error and len(error) <= FEEDBACK_CHARS


def test_partial_credit_counts_passing_tests():
    env = Code(time_limit_s=1.0, partial_credit=True)
    task = env.tasks("train")[0]
    verdict = env.verify(task, fenced("a, b = map(int, input().split())\nprint(3 if a == 1 else 0)"))
    assert verdict.reward == pytest.approx(2 / 3) and verdict.info["passed"] == 2


def test_output_comparison_is_judge_like():
    assert outputs_match("3 \n\n", "3\n", "stdin") and outputs_match("1.50", "1.5", "stdin")
    assert not outputs_match("3\n4", "3", "stdin") and not outputs_match("abc", "abd", "stdin")
    assert outputs_match("[0, 1]", "[0,1]", "call") and not outputs_match("not json", "1", "call")


def test_livecodebench_rows_are_understood():
    row = {"question_id": "abc1", "question_content": "Add.", "starter_code": "",
           "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
           "private_test_cases": json.dumps([{"input": "2 2\n", "output": "4\n", "testtype": "stdin"}]),
           "metadata": "{}"}
    task = ENV.task_from_row(row, "x")
    # The private tests stay encoded in the task and are decoded when a completion is verified.
    assert task.id == "abc1" and task.data["kind"] == "stdin" and len(task.data["tests"]) == 1
    assert ENV.tests_of(task) == [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}]
    functional = from_livecodebench({**row, "public_test_cases": json.dumps([{"input": "1", "output": "1", "testtype": "functional"}]),
                                     "private_test_cases": "", "metadata": json.dumps({"func_name": "f"})})
    assert functional["kind"] == "call" and functional["fn_name"] == "f"
