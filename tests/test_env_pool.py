"""The verifier pool on real Ray actors: failures of every kind become reward 0 with no feedback (a
verifier's error is never teacher feedback) and are counted, the pool goes on until the verifier fails
on a whole round, groups reach the group hook whole, async verifiers work."""

import textwrap

import pytest

from environments import Task
from sdpo.config import EnvironmentConfig
from sdpo.env_pool import EnvPool, VerifierFailing, chunks_at_groups, group_bounds

USER_ENVS = '''
import asyncio, os, time
from environments import Environment, Task, Verdict

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


def test_chunks_never_split_a_group():
    tasks = [t for t in tasks_for(["a", "b", "c", "d", "e"]) for _ in range(4)]
    assert group_bounds(tasks) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    chunks = chunks_at_groups(tasks, 2)
    assert chunks[0][0] == 0 and chunks[-1][1] == 20 and all(a % 4 == 0 and b % 4 == 0 for a, b in chunks)
    assert len(chunks) == 2
    with pytest.raises(ValueError, match="groups of 3"):
        group_bounds(tasks, 3)
