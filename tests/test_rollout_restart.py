"""A learner restart during a run that moves weights by broadcast (the nccl transport's protocol,
over gloo on CPU): learner rank 0 is the sender of the engines' weight group, so after it is
killed the group must be rebuilt with the new rank 0, and every later step must reach the engines.
Before the fix the next sync found the old group "ready" and the new rank 0 had none."""

from __future__ import annotations

import json

import pytest

from conftest import kill_a_learner_once_checkpointed
from sdpo.recipe import load_config
from sdpo.trainer import train

pytestmark = pytest.mark.integration

SMALL = ["steps=4", "prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.samples_per_micro_batch=8",
         "eval.max_tasks=8", "eval.every_steps=0", "checkpoint.every_steps=2", "optimizer.lr=1e-3",
         "environment.kwargs={limit_per_split: 8, feedback: true}", "checkpoint.export_hf=false",
         "rollout.weight_sync=nccl", "rollout.weight_sync_timeout_s=60"]


def test_learner_restart_with_broadcast_weight_sync(tmp_path):
    import threading

    run_dir = tmp_path / "run"
    killed = []
    killer = threading.Thread(target=kill_a_learner_once_checkpointed, args=(run_dir, 2, killed), daemon=True)
    killer.start()
    train(load_config("recipes/quickstart.yaml", [*SMALL, f"logging.run_dir={run_dir}"]))
    killer.join(timeout=5)
    assert killed, "no learner process was found to kill"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["learner/restarts"]) for r in rows if "learner/restarts" in r] == [(2, 1.0)]
    steps = {r["step"]: r for r in rows if "learn/loss" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    # every step sampled with the previous step's weights: the broadcasts after the restart landed
    assert all(r["rollout/policy_version_lag_max"] == 0.0 for r in steps.values())
    # and they are the learner's weights (fp32 both sides): the rollout-vs-learner gap stays tiny
    assert all(r["learn/rollout_logp_gap_abs"] < 1e-3 for r in steps.values())
