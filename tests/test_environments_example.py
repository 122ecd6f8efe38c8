"""A user environment from outside the repository trains through the real loop."""

import json
import shutil
from pathlib import Path

import pytest

from sdpo.recipe import load_config
from sdpo.trainer import train

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_env"


def test_the_example_environment_trains_for_two_steps_from_outside_the_repo(tmp_path):
    outside = shutil.copytree(EXAMPLE, tmp_path / "their_project")  # nothing of it is importable from the repo
    cfg = load_config("recipes/quickstart.yaml", [
        "steps=2", "prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.samples_per_micro_batch=4",
        "eval.max_tasks=8", "eval.every_steps=0", "eval.greedy=false", f"logging.run_dir={tmp_path}/run",
        f"environment.name={outside}/sums.py:Sums", f"environment.kwargs={{path: {outside}/sums.jsonl}}",
    ])
    result = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in rows if "learn/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["verify/failures"] == 0  # the async verifier and the group hook ran in the pool without error
        assert 0 <= r["rollout/success_frac"] <= 1
        # Every failure got a teacher signal (a successful sibling, or the environment's own feedback).
        assert r["teacher/signal_frac"] >= 1.0 - r["rollout/success_frac"] - 1e-9, r
    assert 0 <= result["after"]["eval/success_t"] <= 1
