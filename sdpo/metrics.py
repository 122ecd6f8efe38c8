"""Where numbers go: a JSONL file in the run directory, the console, and wandb / TensorBoard when asked."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tqdm import tqdm

from sdpo.config import Config


class PhaseTimer:
    """`with timer("generate"): ...` records seconds per phase of the current step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time/{phase}_s"] = time.perf_counter() - start


class RunLogger:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.progress: tqdm | None = None  # opened at the first step, so start-up does not skew its ETA
        self.wandb = None
        self.tensorboard = open_tensorboard(run_dir) if cfg.logging.tensorboard else None
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=run_dir.name, dir=str(run_dir),
                                    mode=cfg.logging.wandb_mode, config=cfg.model_dump(mode="json"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, global_step=step)
        if "rollout/reward_mean" in metrics:
            if self.progress is None:
                self.progress = tqdm(total=self.cfg.steps, initial=step - 1, desc="sdpo", unit="step", dynamic_ncols=True)
            self.progress.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}",
                                      success=f"{metrics['rollout/success_frac']:.3f}", refresh=False)
            self.progress.update(1)  # after the postfix, so the bar shows this step's numbers
            if step % self.cfg.logging.console_every_steps == 0 or step == self.cfg.steps:
                self.say(format_step(step, metrics))

    def say(self, text: str) -> None:
        tqdm.write(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def require_tensorboard() -> None:
    """torch.utils.tensorboard imports the optional `tensorboard` package only when a writer is made:
    check at start-up, not after the cluster is up."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("logging.tensorboard=true needs the tensorboard package: `pip install tensorboard` "
                         "(or set logging.tensorboard=false)") from None


def open_tensorboard(run_dir: Path):
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    # Event files next to metrics.jsonl: `tensorboard --logdir runs` shows every run. A short flush
    # interval so curves appear while the run goes, not two minutes late.
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)


def format_step(step: int, m: dict[str, float]) -> str:
    phases = " ".join(f"{k[5:-2]}={v:.2f}s" for k, v in m.items() if k.startswith("time/") and k != "time/step_s")
    return (f"step {step:>4}  reward {m['rollout/reward_mean']:.3f}  success {m['rollout/success_frac']:.3f}  "
            f"signal {m['teacher/signal_frac']:.2f}  loss {m['learn/loss']:.4f}  gnorm {m['learn/grad_norm']:.3f}  "
            f"gap {m['learn/rollout_logp_gap_abs']:.1e}  {m['throughput/tokens_per_s']:.0f} tok/s  [{phases}]")
