"""Asynchronous SDPO on the real system (SPEC section 9): with rollout.max_staleness=1 no batch is
learned from by a policy more than one version newer than the one that sampled it; a resumed run
continues from a checkpoint exactly as the uninterrupted one (a checkpoint is a barrier), and so does
one whose learner rank is killed; and streamed verification returns verdicts in sample order
whichever replica's share arrives first."""

import json
import threading
from pathlib import Path

import pytest

from conftest import kill_a_learner_once_checkpointed
from environments import load_environment
from sdpo.recipe import load_config
from sdpo.trainer import Run, train

# One Ray cluster for the module's runs (each run still starts and stops its own actors).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]

# 8 training prompts, 4 per step; two replicas, so that verification streams per replica share.
SMALL = ["prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.samples_per_micro_batch=8", "rollout.replicas=2",
         "eval.max_tasks=8", "eval.every_steps=0", "checkpoint.every_steps=2", "optimizer.lr=1e-3",
         "checkpoint.export_hf=false", "environment.kwargs={limit_per_split: 8, feedback: true}",
         # the resume test stops a run by giving it fewer steps, which would reshape a decaying schedule
         "optimizer.lr_schedule=constant"]
VOLATILE = ("time/", "throughput/", "checkpoint/")


def rows(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in lines if "learn/loss" in r}


@pytest.fixture(scope="module")
def async_run(tmp_path_factory, local_ray):
    run_dir = tmp_path_factory.mktemp("async") / "run"
    train(load_config("recipes/quickstart.yaml", ["steps=6", "rollout.max_staleness=1", *SMALL, f"logging.run_dir={run_dir}"]))
    return run_dir


def test_no_sample_is_older_than_max_staleness(async_run):
    got = rows(async_run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, r in got.items():
        assert r["rollout/staleness_max"] <= 1, (step, r)
        assert r["rollout/staleness_frac_0"] + r["rollout/staleness_frac_1"] == pytest.approx(1.0)
        assert r["rollout/policy_version_lag_max"] == r["rollout/staleness_max"]
    # Steps 1, 3 and 5 follow a start or a barrier (the checkpoint after steps 2 and 4): the engines
    # hold the newest weights, so they read 0. The others are sampled while the step before learns.
    for step in (1, 3, 5):
        assert got[step]["rollout/staleness_max"] == 0
    assert any(got[step]["rollout/staleness_mean"] > 0 for step in (2, 4, 6)), "nothing overlapped: not asynchronous"


def test_a_resumed_async_run_and_a_replaced_learner_continue_as_the_uninterrupted_run(async_run, tmp_path):
    """Stopped at checkpoint 2 and resumed; then a learner rank SIGKILLed after checkpoint 4 while the
    rollout thread samples ahead: its in-flight batches are dropped and the learner group restarts
    from checkpoint 4. Either way the run goes on from a barrier, as the uninterrupted one did."""
    run_dir, killed = tmp_path / "run", []
    first = ["rollout.max_staleness=1", *SMALL, f"logging.run_dir={run_dir}"]
    train(load_config("recipes/quickstart.yaml", ["steps=2", *first]))  # stops at the checkpoint after step 2
    killer = threading.Thread(target=kill_a_learner_once_checkpointed, args=(run_dir, 4, killed), daemon=True)
    killer.start()
    train(load_config("recipes/quickstart.yaml", ["steps=6", *first]))  # resume: auto, from step 2
    killer.join(timeout=5)
    assert killed, "no learner process was found to kill"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["learner/restarts"]) for r in lines if "learner/restarts" in r] == [(4, 1.0)]
    expected, got = rows(async_run), rows(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # each step logged once: the replayed ones replace nothing twice
    # The batch after a checkpoint is sampled by the checkpoint's weights from the checkpoint's
    # prompt position, whether the run stopped there, lost a learner there, or neither: the same
    # samples, loss and gradient.
    assert got[3] == expected[3] and got[5] == expected[5]
    assert all(r["rollout/staleness_max"] <= 1 for r in got.values())


def test_streamed_verdicts_come_back_in_sample_order(tmp_path):
    cfg = load_config("recipes/quickstart.yaml", ["steps=0", *SMALL, f"logging.run_dir={tmp_path}/run"])
    env = load_environment(cfg.environment.name, cfg.environment.kwargs)
    tasks = list(env.tasks("train"))[:6]
    run = Run(cfg)
    try:
        run.start()
        arrivals = []
        run.envs.submit = record(run.envs.submit, arrivals)
        rollouts = run.sample_and_verify(tasks, 3, 1.0, seed=7)
        assert len(arrivals) == 2  # one verification call per replica share, each as soon as it was generated
        assert sorted(j for share in arrivals for j in share) == sorted(t.id for t in tasks for _ in range(3))
        texts = [run.tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in rollouts.groups for c in g]
        # the same verdicts, in the same order, as the verifier gives sample by sample in this process
        assert rollouts.verdicts == [env.verify(t, text) for t, text in zip([t for t in tasks for _ in range(3)], texts)]
    finally:
        run.close()


def record(submit, arrivals):
    def wrapped(tasks, completions, group_size=None):
        arrivals.append([t.id for t in tasks])
        return submit(tasks, completions, group_size)
    return wrapped
