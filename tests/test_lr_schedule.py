"""optimizer.lr_schedule: the multiplier per optimizer step, hand-computed, and the scheduler the
learner builds from a recipe (counting updates_per_batch * mini_batches_per_batch steps per batch)."""

import math

import pytest
import torch

from sdpo.learner.schedule import lr_factor, make_scheduler
from sdpo.recipe import load_config


def test_constant_is_warmup_then_one():
    assert [lr_factor(s, 10, 4, "constant", 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # no warm-up: full lr from the first step, as before the schedule existed
    assert lr_factor(0, 10, 0, "constant", 0.0) == 1.0


def test_linear_and_cosine_decay_towards_the_floor_over_the_run():
    # 10 steps, 2 of warm-up: the decay spans steps 2..9, progress (s - 2) / 8
    assert [lr_factor(s, 10, 2, "linear", 0.0) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(1 - 4 / 8)
    assert lr_factor(9, 10, 2, "linear", 0.1) == pytest.approx(0.1 + 0.9 * (1 - 7 / 8))  # the last step still learns
    assert lr_factor(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(9, 10, 2, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    # past the planned end (a resumed run given more steps): stays at the floor
    assert lr_factor(50, 10, 2, "cosine", 0.2) == pytest.approx(0.2)


def test_the_learner_scheduler_counts_every_optimizer_step_of_the_run():
    cfg = load_config("recipes/quickstart.yaml", ["steps=3", "optimizer.updates_per_batch=2",
                                                  "optimizer.mini_batches_per_batch=2", "optimizer.lr=1.0",
                                                  "optimizer.warmup_steps=0", "optimizer.lr_schedule=linear"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    scheduler = make_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(12):  # 3 batches x 2 passes x 2 mini-batches
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1 - k / 12 for k in range(12)])


def test_unknown_schedule_names_the_key():
    with pytest.raises(Exception, match="lr_schedule"):
        load_config("recipes/quickstart.yaml", ["optimizer.lr_schedule=exponential"])
    with pytest.raises(Exception, match="min_lr_ratio"):
        load_config("recipes/quickstart.yaml", ["optimizer.min_lr_ratio=1.5"])
