"""The verifier pool on real Ray actors: failures of every kind become reward 0 with no feedback (a
verifier's error is never teacher feedback) and are counted, the pool goes on until the verifier fails
on a whole round, groups reach the group hook whole, async verifiers work, and multi-turn episodes
step in the verifier processes with their failures contained (SPEC 2a)."""

import json
import math
import os
import textwrap

import pytest

from environments import Task
from sdpo.config import EnvironmentConfig
from sdpo.env_pool import EnvPool, VerifierFailing, chunks_at_groups, group_bounds

USER_ENVS = '''
import asyncio, os, time
from environments import Environment, Task, Verdict
from environments.multi_turn import MultiTurnEnvironment, function_tool

class Flaky(Environment):
    max_concurrency = 2

    def tasks(self, split):
        return [Task(id="t", messages=[{"role": "user", "content": "x"}])]

    def verify(self, task, completion):
        if completion == "raise":
            raise KeyError("no such field")
        if completion == "hang":
            time.sleep(60)
        if completion == "crash":
            os._exit(3)
        if completion == "wrong type":
            return 42
        if completion == "nan":
            return Verdict(reward=float("nan"))
        if completion == "mutated":
            v = Verdict(reward=1.0)
            v.feedback = ["not", "a", "string"]
            return v
        return Verdict(reward=float(completion == "ok"), feedback=None if completion == "ok" else "not ok")

class AsyncEnv(Flaky):
    max_concurrency = 8

    async def verify(self, task, completion):
        if completion == "hang":
            await asyncio.sleep(60)
        if completion == "raise":
            raise ValueError("bad")
        await asyncio.sleep(0.05)
        return Verdict(reward=float(completion == "ok"))

class AlwaysRaises(Flaky):
    def verify(self, task, completion):
        raise RuntimeError("verifier bug")

class Grouped(Flaky):
    def review_group(self, task, completions, verdicts):
        if task.id == "explode":
            raise RuntimeError("hook bug")
        wins = sum(v.reward for v in verdicts)
        return [Verdict(v.reward, f"{task.id}: {wins:g} of {len(verdicts)} passed", v.info) for v in verdicts]

class Tools(MultiTurnEnvironment):
    tools = [function_tool("act", "Do something", what="string")]

    def tasks(self, split):
        return [Task(id=str(i), messages=[{"role": "user", "content": f"{i}+{i}="}]) for i in range(4)]

    def start(self, task):
        if task.id == "slow start":
            time.sleep(60)
        state = super().start(task)
        state.data.update(pid=os.getpid(), calls=0)
        return state

    def call_tool(self, state, name, arguments):
        state.data["calls"] += 1
        if arguments["what"] == "die":
            os._exit(3)
        if arguments["what"] == "stuck":
            time.sleep(60)
        where = "its own process" if state.data["pid"] == os.getpid() else "another process"
        return f"call {state.data['calls']} in {where}"

    def verify(self, task, completion):
        verdict = Verdict(float(completion == "ok"), "say ok")
        if completion == "nan":
            verdict.reward = float("nan")  # past Verdict's own check
        return verdict

class Chatty(Tools):
    # a simulated user answers the model's first two turns, then the third is judged; no tools, so
    # any chat template will do (the quickstart model's has no tool calls)
    tools = []

    def step(self, state, message):
        if state.turn < 3:
            return [{"role": "tool", "content": f"turn {state.turn} seen by {os.getpid()}"}]
        return Verdict(float(len(message["content"]) % 2), "odd lengths win")
'''


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user_envs") / "user_envs.py"
    path.write_text(textwrap.dedent(USER_ENVS))
    return path


def pool(env_file, cls: str, workers: int = 2, timeout_s: float = 1.0) -> EnvPool:
    return EnvPool(EnvironmentConfig(name=f"{env_file}:{cls}", workers=workers, num_cpus_per_worker=0.1,
                                     timeout_s_per_call=timeout_s))


def tasks_for(ids: list[str]) -> list[Task]:
    return [Task(id=i, messages=[{"role": "user", "content": i}]) for i in ids]


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_every_failure_becomes_a_counted_zero_without_feedback_and_order_is_kept(env_file):
    envs = pool(env_file, "Flaky")
    completions = ["ok", "raise", "no", "hang", "wrong type", "ok", "nan", "mutated"]
    verdicts = envs.verify(tasks_for([str(i) for i in range(8)]), completions)
    assert [v.reward for v in verdicts] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    failed = [verdicts[i] for i in (1, 3, 4, 6, 7)]
    assert all(v.feedback is None for v in failed)  # never feedback: the student did not cause it
    assert "KeyError" in verdicts[1].info["verifier_error"] and verdicts[1].info["verifier_failure"] == "error"
    assert verdicts[2].feedback == "not ok" and "verifier_failure" not in verdicts[2].info
    assert "timed out after 1 s" in verdicts[3].info["verifier_error"] and verdicts[3].info["verifier_failure"] == "timeout"
    assert "expected a Verdict" in verdicts[4].info["verifier_error"] and verdicts[4].info["verifier_failure"] == "invalid"
    assert "finite number in [0, 1], got nan" in verdicts[6].info["verifier_error"]
    assert "feedback must be a string or None" in verdicts[7].info["verifier_error"]
    assert envs.failures == {"error": 2, "timeout": 1, "invalid": 2}
    # Hung threads are abandoned, not waited for: the worker keeps its full concurrency.
    again = envs.verify(tasks_for(["a", "b", "c"]), ["hang", "hang", "ok"])
    assert [v.reward for v in again] == [0.0, 0.0, 1.0]


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_a_verifier_that_always_fails_stops_the_run(env_file):
    envs = pool(env_file, "AlwaysRaises", workers=1)
    with pytest.raises(VerifierFailing, match=r"failed on all 4 calls of one round \(error: 4\).*RuntimeError: verifier bug"):
        envs.verify(tasks_for(["a", "b", "c", "d"]), ["x"] * 4)


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_a_crashed_worker_scores_its_chunk_zero_and_comes_back(env_file):
    envs = pool(env_file, "Flaky", workers=2, timeout_s=5.0)
    verdicts = envs.verify(tasks_for(["a", "b", "c", "d"]), ["ok", "crash", "ok", "ok"])
    assert [v.reward for v in verdicts] == [0.0, 0.0, 1.0, 1.0]  # the first worker died holding a and b
    assert all("process died" in v.info["verifier_error"] and v.feedback is None for v in verdicts[:2])
    assert envs.failures == {"crash": 2}
    after = envs.verify(tasks_for(["e", "f"]), ["ok", "ok"])  # the actor was restarted
    assert [v.reward for v in after] == [1.0, 1.0]


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_async_verifiers_run_concurrently_with_their_own_deadlines(env_file):
    envs = pool(env_file, "AsyncEnv", workers=1)
    pending = envs.submit(tasks_for([str(i) for i in range(10)]), ["ok"] * 7 + ["hang", "raise", "no"])
    verdicts = pending.result()
    assert [v.reward for v in verdicts] == [1.0] * 7 + [0.0] * 3
    assert verdicts[7].info["verifier_failure"] == "timeout" and verdicts[8].info["verifier_failure"] == "error"
    assert "verifier_failure" not in verdicts[9].info


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_the_group_hook_sees_whole_groups_and_its_failure_is_contained(env_file):
    envs = pool(env_file, "Grouped", workers=2)
    tasks = [t for t in tasks_for(["p", "q", "explode"]) for _ in range(3)]
    verdicts = envs.verify(tasks, ["ok", "no", "ok", "no", "no", "no", "ok", "ok", "ok"], group_size=3)
    assert [v.feedback for v in verdicts[:6]] == ["p: 2 of 3 passed"] * 3 + ["q: 0 of 3 passed"] * 3
    assert [v.reward for v in verdicts[6:]] == [1.0] * 3  # the hook failed: per-sample verdicts kept, flagged
    assert all(v.info["verifier_failure"] == "group_hook" and "hook bug" in v.info["verifier_error"] for v in verdicts[6:])


def act(what: str) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"name": "act", "arguments": {"what": what}}]}


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_episode_steps_run_in_the_verifier_processes_and_their_failures_are_contained(env_file, monkeypatch):
    envs = pool(env_file, "Tools", workers=2)
    states = envs.start_episodes(tasks_for(["a", "b", "c", "d"]), [0, 1, 2, 3])
    assert len({s.data["pid"] for s in states}) == 2 and os.getpid() not in {s.data["pid"] for s in states}
    for calls in (1, 2):  # the state comes back with each result and goes to the same process again
        out = envs.step_episodes([(s, act("x")) for s in states], [0, 1, 2, 3], timeout_s=2.0)
        assert [r[0]["content"] for r, _ in out] == [f"call {calls} in its own process"] * 4
        states = [state for _, state in out]
    # keys 0, 2, 4 go to one process, 1 to the other, which the tool kills
    out = envs.step_episodes([(states[0], act("stuck")), (states[1], act("die")), (states[2], {"role": "assistant", "content": "nan"}),
                              (states[0], {"role": "assistant", "content": "ok"})], [0, 1, 2, 4], timeout_s=1.0)
    stuck, died, nan, ok = (r for r, _ in out)
    assert stuck.reward == 0.0 and stuck.info["episode_end"] == "tool_timeout" and "1 s" in stuck.feedback  # the model's doing
    assert died.info["verifier_failure"] == "crash" and died.feedback is None  # not the model's: no teacher signal
    assert nan.info["verifier_failure"] == "invalid" and "nan" in nan.info["verifier_error"] and nan.feedback is None
    assert ok.reward == 1.0
    again = envs.start_episodes(tasks_for(["e"]), [1])  # the killed process was restarted
    assert again[0].data["pid"] not in {s.data["pid"] for s in states}
    # a process that does not answer at all (stuck where no deadline of its own reaches) is killed
    monkeypatch.setattr("sdpo.env_pool.EPISODE_START_TIMEOUT_S", 1.0)
    [slow] = envs.start_episodes(tasks_for(["slow start"]), [0])
    assert slow.info["verifier_failure"] == "timeout" and slow.feedback is None
    assert envs.step_episodes([(states[2], act("x"))], [0], timeout_s=2.0)[0][0][0]["content"].startswith("call")


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_a_multi_turn_run_steps_its_episodes_in_the_verifier_actors(env_file, tmp_path):
    from sdpo.recipe import load_config
    from sdpo.trainer import train

    run_dir = tmp_path / "run"
    train(load_config("recipes/quickstart.yaml", [
        "steps=2", "prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.engine=hf", "eval.max_tasks=4",
        "eval.every_steps=0", "checkpoint.export_hf=false", f"environment.name={env_file}:Chatty",
        "environment.max_turns_per_episode=3", "environment.max_tokens_per_episode=120", f"logging.run_dir={run_dir}"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learn/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # every episode is the model's three turns around two observations, none cut short
        assert r["episode/turns_mean"] == 3.0 and r["verify/failures"] == 0.0, r
        assert not any(k.startswith("episode/ended_") for k in r) and math.isfinite(r["learn/loss"])


def test_chunks_never_split_a_group():
    tasks = [t for t in tasks_for(["a", "b", "c", "d", "e"]) for _ in range(4)]
    assert group_bounds(tasks) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    chunks = chunks_at_groups(tasks, 2)
    assert chunks[0][0] == 0 and chunks[-1][1] == 20 and all(a % 4 == 0 and b % 4 == 0 for a, b in chunks)
    assert len(chunks) == 2
    with pytest.raises(ValueError, match="groups of 3"):
        group_bounds(tasks, 3)
