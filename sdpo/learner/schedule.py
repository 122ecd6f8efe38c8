"""The learning-rate multiplier per optimizer step: linear warm-up, then constant or a decay towards
`min_lr_ratio * lr`, reached at the end of the run's last optimizer step (what verl, TRL and OpenRLHF call the
scheduler). One optimizer step is one `scheduler.step()`; a run has
steps * updates_per_batch * mini_batches_per_batch of them.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of optimizer.lr for optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    # progress 0 at the first step after warm-up, (n - 1) / n at the run's last step (so that step
    # still learns), and capped at 1 beyond it (a resumed run given more steps than it started with)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optimizer.lr_schedule: unknown {kind!r} (constant, linear, cosine)")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def make_scheduler(optimizer, cfg):
    """The LambdaLR the learner steps once per optimizer step (its state is checkpointed per rank)."""
    import torch

    opt = cfg.optimizer
    total = cfg.steps * opt.updates_per_batch * opt.mini_batches_per_batch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, opt.warmup_steps, opt.lr_schedule, opt.min_lr_ratio))
