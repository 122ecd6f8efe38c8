"""`python -m sdpo.plot RUN_DIR [--out DIR]`: PNG plots of a run's metrics.jsonl, so a user can look
instead of read. One file per quantity plus `overview.png` with every panel; written to
RUN_DIR/plots unless --out says otherwise. Works on a run that is still going or was killed."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Callable

import matplotlib
import yaml

matplotlib.use("Agg")  # files only: no display needed, and none is touched on a headless node
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from matplotlib.axes import Axes  # noqa: E402

Series = tuple[list[int], list[float]]
PHASES = ("generate", "verify", "teacher_contexts", "learn", "weight_sync")


class PlotError(ValueError):
    pass


def load_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        hint = "" if run_dir.is_dir() else " (the directory does not exist)"
        raise PlotError(f"{path} not found{hint}: pass a run directory written by `python -m sdpo.run`, "
                        "e.g. runs/quickstart-20260101-120000")
    rows: list[dict] = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # a run killed mid-write leaves a partial last line
                print(f"warning: {path}:{number}: skipped a partial last line", file=sys.stderr)
                continue
            raise PlotError(f"{path}:{number} is not JSON ({err}); the file is corrupt") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise PlotError(f"{path}:{number}: each line must be a JSON object with an integer 'step'")
        rows.append(row)
    if not rows:
        raise PlotError(f"{path} has no rows yet: the run has not finished its first evaluation or step")
    return rows


def series(rows: list[dict], key: str) -> Series:
    # A resumed run logs again the steps after its last checkpoint: the later value is the one that counts.
    by_step: dict[int, float] = {}
    for row in rows:
        if isinstance(row.get(key), (int, float)):
            by_step[row["step"]] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean, so the curve at step s uses only steps <= s (no peeking ahead)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    return max(1, n // 25)  # ~25 independent points per curve: noise down, trends kept


def _noisy(ax: Axes, s: Series, label: str, color: str) -> int:
    """Raw per-step values faint, trailing moving average on top; returns the window used."""
    steps, values = s
    window = smoothing_window(len(values))
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, moving_average(values, window), color=color, linewidth=2,
            label=label if window == 1 else f"{label} (mean of last {window} steps)")
    return window


def draw_reward(ax: Axes, rows: list[dict]) -> bool:
    reward, success = series(rows, "rollout/reward_mean"), series(rows, "rollout/success_frac")
    if not reward[0]:
        return False
    _noisy(ax, reward, "mean reward", "tab:blue")
    if success[0] and success[1] != reward[1]:  # identical for 0/1 rewards: one line says it all
        _noisy(ax, success, "success fraction", "tab:green")
    ax.set(title="Training reward (samples of each step)", ylabel="reward per sample")
    return True


def draw_eval(ax: Axes, rows: list[dict], sampled_label: str = "sampled at the eval temperature") -> bool:
    drawn = False
    for key, label, color in (("eval/success_t", sampled_label, "tab:orange"),
                              ("eval/success_greedy", "greedy", "tab:purple")):
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, marker="o", color=color, label=label)
            drawn = True
    ax.set(title="Held-out success", ylabel="success rate", ylim=(-0.02, 1.02))
    return drawn


def draw_loss(ax: Axes, rows: list[dict]) -> bool:
    loss = series(rows, "learn/loss")
    if not loss[0]:
        return False
    _noisy(ax, loss, "loss", "tab:red")
    # Not named "divergence": with loss.objective=grpo or hybrid it holds a policy-gradient term too.
    ax.set(title="Training loss (learn/loss)", ylabel="loss per batch")
    return True


def draw_length(ax: Axes, rows: list[dict]) -> bool:
    length = series(rows, "rollout/response_tokens_mean")
    if not length[0]:
        return False
    _noisy(ax, length, "mean response length", "tab:brown")
    ax.set(title="Response length", ylabel="tokens per response")
    return True


def draw_phase_time(ax: Axes, rows: list[dict]) -> bool:
    present = [(p, series(rows, f"time/{p}_s")) for p in PHASES]
    present = [(p, s) for p, s in present if s[0]]
    if not present:
        return False
    steps = present[0][1][0]
    window = smoothing_window(len(steps))
    # Stacked, so the height is the step time the phases account for and each band its share.
    stacked = [moving_average(s[1], window) for _, s in present if s[0] == steps]
    labels = [p.replace("_", " ") for p, s in present if s[0] == steps]
    ax.stackplot(steps, stacked, labels=labels, alpha=0.8)
    total = series(rows, "time/step_s")
    if total[0]:
        ax.plot(total[0], moving_average(total[1], window), color="black", linewidth=1.5, label="whole step")
    note = "" if window == 1 else f", mean of last {window} steps"
    ax.set(title=f"Time per step by phase{note}", ylabel="seconds")
    return True


def draw_teacher_signal(ax: Axes, rows: list[dict]) -> bool:
    signal = series(rows, "teacher/signal_frac")
    if not signal[0]:
        return False
    _noisy(ax, signal, "samples with a teacher signal", "tab:cyan")
    ax.set(title="Teacher signal (successful sibling or feedback)", ylabel="fraction of samples", ylim=(-0.02, 1.02))
    return True


PANELS: dict[str, Callable[[Axes, list[dict]], bool]] = {
    "reward": draw_reward,
    "eval_success": draw_eval,
    "loss": draw_loss,
    "response_length": draw_length,
    "phase_time": draw_phase_time,
    "teacher_signal": draw_teacher_signal,
}


def eval_label(run_dir: Path) -> str:
    """Names the eval temperature and samples per task from the run's config.yaml, when it has one."""
    try:
        evaluation = yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]
        return f"sampled, T={evaluation['temperature']:g}, {evaluation['samples_per_task']} per task"
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return "sampled at the eval temperature"


def _finish(ax: Axes) -> None:
    ax.set_xlabel("step (optimizer steps)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Writes one PNG per panel that has data, and overview.png; returns the paths written."""
    rows = load_metrics(run_dir)
    panels = {**PANELS, "eval_success": functools.partial(draw_eval, sampled_label=eval_label(run_dir))}
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    drawn: list[str] = []
    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if draw(ax, rows):
            _finish(ax)
            fig.suptitle(run_dir.name, fontsize="small", color="gray")
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=110)
            written.append(out_dir / f"{name}.png")
            drawn.append(name)
        plt.close(fig)
    if not drawn:
        raise PlotError(f"{run_dir / 'metrics.jsonl'} has none of the metrics this command plots")
    cols = 3 if len(drawn) > 4 else 2
    fig, axes = plt.subplots((len(drawn) + cols - 1) // cols, cols, figsize=(6 * cols, 3.8 * ((len(drawn) + cols - 1) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, drawn):
        panels[name](ax, rows)
        _finish(ax)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(f"{run_dir.name}: {max(r['step'] for r in rows)} steps")
    fig.tight_layout()
    fig.savefig(out_dir / "overview.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "overview.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo.plot", description="PNG plots of an SDPO run's metrics.")
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl, e.g. runs/quickstart-...")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
