"""Recipes: defaults, overrides, and errors that name the key, all before any work starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.config import Config
from sdpo.recipe import RecipeError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_spec():
    cfg = Config()
    assert (cfg.loss.alpha, cfg.loss.topk, cfg.loss.add_tail, cfg.loss.rollout_is_cap) == (0.5, 100, True, 2.0)
    assert cfg.loss.aggregation == "sequence_mean"
    assert (cfg.teacher.kind, cfg.teacher.update_rate) == ("ema", 0.05)
    assert (cfg.optimizer.betas, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == ((0.9, 0.999), 0.01, 1.0)
    assert cfg.teacher_context.dont_reprompt_on_self_success and cfg.teacher_context.environment_feedback_only_without_solution


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 7\nloss:\n  alpha: 1.0\n")
    cfg = load_config(recipe, ["loss.topk=null", "environment.kwargs={feedback: true}", "name=x"])
    assert (cfg.steps, cfg.loss.alpha, cfg.loss.topk, cfg.environment.kwargs, cfg.name) == (7, 1.0, None, {"feedback": True}, "x")


@pytest.mark.parametrize("overrides, expected", [
    (["loss.alhpa=1"], "loss.alhpa: unknown key; valid keys here: objective, alpha, full_logit_distillation, topk"),
    (["loss.alpha=1.5"], "loss.alpha: Input should be less than or equal to 1"),
    (["steps=many"], "steps: Input should be a valid integer"),
    (["rollout.engine=tgi"], "rollout.engine: Input should be 'auto', 'vllm' or 'hf'"),
    (["prompts_per_step=3", "rollout.samples_per_prompt=1"], "must be divisible by learner.world_size = 2"),
    (["model.attn_implementation=flash_attention_2"], "flash_attention_2 needs device=cuda"),
    (["loss"], "must look like dotted.key=value"),
    (["loss=3", "loss.alpha=1"], "'loss' is a value, not a section"),
])
def test_errors_name_the_key(overrides, expected):
    with pytest.raises(RecipeError, match=None) as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_config(bad)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sdpo.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_dry_run_prints_config_and_placement():
    out = _cli("recipes/quickstart.yaml", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "prompts_per_step: 16" in out.stdout
    for role in ("rollout", "environment", "learner", "driver"):
        assert role in out.stdout
    assert "FSDP2 over gloo" in out.stdout


@pytest.mark.slow
def test_cli_rejects_bad_input_before_any_work():
    out = _cli("recipes/quickstart.yaml", "loss.alpah=1")
    assert out.returncode == 2 and "loss.alpah: unknown key" in out.stderr
    out = _cli("recipes/quickstart.yaml", "learner.num_cpus_per_rank=8")
    assert out.returncode == 2 and "ask for" in out.stderr and "learner.num_cpus_per_rank" in out.stderr
    out = _cli("recipes/quickstart.yaml", "environment.name=no_such_module:Env")
    assert out.returncode == 2 and "cannot import 'no_such_module'" in out.stderr
