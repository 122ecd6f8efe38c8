"""The multi-turn code environment: the model runs its program on the public tests (in the sandbox)
before it submits; the judge's feedback comes back each turn and the hidden tests decide the reward.
Offline on the bundled sample, through real episodes (sdpo/episodes.py) driven by scripted turns."""

import json

import pytest

from environments.code_multi_turn import TOOL_INSTRUCTIONS, MultiTurnCode
from sdpo.episodes import EpisodeLimits, run_episodes
from sdpo.rollout.base import Completion, Sampling
from sdpo.tiny.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow

ENV = MultiTurnCode(time_limit_s=1.0, public_tests=1)
SUM_TWO = next(t for t in ENV.tasks("train") if t.id == "sum-two")  # tests: "1 2", "-5 5", "1000000000 1000000000"
TOK = build_tokenizer()


def run_tests_call(code: str) -> str:
    return '<tool_call>\n{"name": "run_tests", "arguments": %s}\n</tool_call>' % json.dumps({"code": code})


def episode(*turns: str):
    """One episode whose k-th model turn is ``turns[k]`` (a scripted engine on the tiny tokenizer)."""
    def generate(prompts, sampling):
        k = len(calls)
        calls.append(prompts)
        ids = TOK.encode(turns[k], add_special_tokens=False) + [TOK.eos_token_id]
        return [[Completion(ids, [0.0] * len(ids), "stop")] for _ in prompts]

    calls: list = []
    sampling = Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=2048, stop_token_ids=(TOK.eos_token_id,), seed=0)
    [[ep]] = run_episodes(generate, TOK, ENV, [SUM_TWO], sampling, EpisodeLimits(4, 4096, 30.0))
    return ep


def test_a_run_tests_call_returns_the_sandboxs_verdict_on_the_public_tests_then_the_submission_is_judged():
    assert SUM_TWO.messages[-1]["content"].endswith(TOOL_INSTRUCTIONS)
    ep = episode(run_tests_call("a, b = map(int, input().split())\nprint(a - b)"),
                 run_tests_call("a, b = map(int, input().split())\nprint(a + b)"),
                 "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    tool_replies = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert tool_replies == ["Passed 0 of 1 public test.\nWrong Answer\nInput:\n1 2\nOutput:\n-1\nExpected:\n3",
                            "Passed 1 of 1 public test."]
    assert ep.turns == 3 and ep.verdict.reward == 1.0 and ep.verdict.info == {"passed": 3, "tests": 3}
    # the observations are in the episode's ids, out of the loss
    assert "<tool_response>\nPassed 1 of 1 public test.\n</tool_response>" in TOK.decode(ep.token_ids)
    assert 0 in ep.loss_mask


def test_a_program_that_crashes_scores_0_with_the_judges_feedback():
    ep = episode(run_tests_call("print(1 / 0)"), "```python\nprint(1 / 0)\n```")
    assert ep.messages[1]["content"].startswith("Passed 0 of 1 public test.\nRuntime Error\nZeroDivisionError")
    assert ep.verdict.reward == 0.0
    assert ep.verdict.feedback == "Runtime Error\nZeroDivisionError: division by zero (line 1)\nLast input:\n1 2"


def test_the_hidden_tests_decide_the_reward():
    # right on the public test ("1 2"), wrong on a hidden one
    ep = episode("```python\na, b = map(int, input().split())\nprint(a + b if a < 100 else 0)\n```")
    assert ep.verdict.reward == 0.0 and ep.verdict.info == {"passed": 2, "tests": 3}
    assert ep.verdict.feedback == "Wrong Answer\nInput:\n1000000000 1000000000\nOutput:\n0\nExpected:\n2000000000"


def test_the_gpu_recipe_loads_and_builds_its_environment_on_the_sample():
    from environments import is_multi_turn, load_environment
    from sdpo.recipe import load_config

    cfg = load_config("recipes/code_tools_qwen3.yaml", ["environment.kwargs.dataset=sample"])
    env = load_environment(cfg.environment.name, cfg.environment.kwargs)
    assert is_multi_turn(env) and cfg.model.path.startswith("Qwen/Qwen3-")
    assert env.tasks("train")[0].messages[-1]["content"].endswith(TOOL_INSTRUCTIONS)
