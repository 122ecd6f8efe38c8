"""Train one recipe under several objectives and seeds; plot held-out success against steps and
against training seconds; print a markdown table.

    python benchmarks/training/compare_objectives.py --recipe recipes/quickstart.yaml --seeds 0 1 2 \
        --variant sdpo= --variant "grpo=loss.objective=grpo optimizer.lr=3e-4" \
        --out benchmarks/results/sdpo_vs_grpo

Each run is the real system (`python -m sdpo.run`), one after another so that they do not share
the CPU. A run whose metrics already hold its final evaluation is reused, so an interrupted
comparison continues where it stopped.

Long runs on a shared machine: ``--segment-steps N --lock /tmp/sdpo-heavy.lock`` runs each one in
segments of N steps, each its own `flock LOCK timeout ... python -m sdpo.run ... steps=K`, resuming
from the run's own checkpoint (checkpoint.resume=auto in a fixed run dir, every 25 steps), so that no
single hold of the lock lasts longer than a segment. A segment past ``--segment-timeout`` is
interrupted (SIGINT, so that Ray shuts down) and the next call resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(recipe: str, out: Path, name: str, overrides: list[str], seed: int, extra: list[str],
        steps: int | None = None, segment: int | None = None, lock: str | None = None, segment_timeout: int = 400) -> Path:
    run_dir = out / f"{name}-seed{seed}"
    if final_eval(run_dir, steps) is not None:
        return run_dir
    cmd = [sys.executable, "-m", "sdpo.run", recipe, f"seed={seed}", f"logging.run_dir={run_dir}", f"name={name}", *extra, *overrides]
    if not segment:
        cmd += [f"steps={steps}"] if steps else []
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return run_dir
    if not steps:
        raise SystemExit("--segment-steps needs --steps (the run's total)")
    prefix = ["flock", lock] if lock else []
    prefix += ["timeout", "-s", "INT", "-k", "60", str(segment_timeout)]
    done = last_checkpoint(run_dir)
    while done < steps:
        upto = min(steps, done + segment)
        seg = [*prefix, *cmd, f"steps={upto}", "checkpoint.every_steps=25", "checkpoint.resume=auto", "checkpoint.export_hf=false"]
        print("$", " ".join(seg), flush=True)
        subprocess.run(seg, check=True)
        done = last_checkpoint(run_dir)
    return run_dir


def last_checkpoint(run_dir: Path) -> int:
    found = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")] if run_dir.exists() else []
    return max(found, default=0)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def final_eval(run_dir: Path, steps: int | None = None) -> dict | None:
    config = run_dir / "config.yaml"
    evals = [r for r in rows(run_dir) if "eval/success_t" in r]
    if not evals or not config.exists():
        return None
    import yaml

    steps = steps or yaml.safe_load(config.read_text())["steps"]
    return evals[-1] if evals[-1]["step"] == steps else None


def curve(run_dir: Path, key: str) -> list[tuple[int, float, float]]:
    """(step, training seconds so far, held-out success) at every evaluation."""
    seconds, elapsed, points = {}, 0.0, []
    for r in rows(run_dir):
        if "time/step_s" in r:
            elapsed += r["time/step_s"]
            seconds[r["step"]] = elapsed
    for r in rows(run_dir):
        if key in r:
            points.append((r["step"], seconds.get(r["step"], 0.0), r[key]))
    return points


def mean_curve(curves: list[list[tuple[int, float, float]]]) -> list[tuple[int, float, float]]:
    steps = sorted(set.intersection(*(set(p[0] for p in c) for c in curves)))
    out = []
    for s in steps:
        at = [next(p for p in c if p[0] == s) for c in curves]
        out.append((s, statistics.mean(p[1] for p in at), statistics.mean(p[2] for p in at)))
    return out


def first_reaching(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    for step, secs, value in points:
        if value >= target - 1e-9:
            return step, secs
    return None


def plot(results: dict[str, list[list[tuple[int, float, float]]]], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, curves), color in zip(results.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for c in curves:
            axes[0].plot([p[0] for p in c], [p[2] for p in c], color=color, alpha=0.25, lw=1)
            axes[1].plot([p[1] for p in c], [p[2] for p in c], color=color, alpha=0.25, lw=1)
        m = mean_curve(curves)
        axes[0].plot([p[0] for p in m], [p[2] for p in m], color=color, lw=2.5, marker="o", label=f"{name} (mean of {len(curves)})")
        axes[1].plot([p[1] for p in m], [p[2] for p in m], color=color, lw=2.5, marker="o", label=name)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training seconds (generation + verification + learning + sync; evaluation excluded)")
    for ax in axes:
        ax.set_ylabel(f"held-out success ({key.split('/')[-1]})")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=space-separated overrides (the first is the one compared)")
    parser.add_argument("--baseline", help="variant whose final success the others must reach (default: the last)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--key", default="eval/success_t")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="default: OUT/success.png (e.g. OUT/teacher_probe.png with --key probe/teacher_success)")
    parser.add_argument("--summary", type=Path, help="default: OUT/summary.md")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the recipe's)")
    parser.add_argument("--segment-steps", type=int, help="run each in segments of this many steps, resuming from its checkpoints")
    parser.add_argument("--lock", help="with --segment-steps: flock this file around each segment (e.g. /tmp/sdpo-heavy.lock)")
    parser.add_argument("--segment-timeout", type=int, default=400, help="seconds a segment may run (default 400)")
    parser.add_argument("--runs-only", action="store_true", help="run (or continue) the runs, no plot or table")
    parser.add_argument("--table-only", action="store_true", help="no runs: plot and tabulate the runs already in OUT, finished or not")
    parser.add_argument("extra", nargs="*", help="overrides for every run")
    args = parser.parse_args()

    variants = dict(v.split("=", 1) for v in args.variant)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [f"eval.every_steps={args.eval_every}", *args.extra]
    results = {}
    for name, overrides in variants.items():
        if args.table_only:
            results[name] = [curve(args.out / f"{name}-seed{s}", args.key) for s in args.seeds if (args.out / f"{name}-seed{s}").exists()]
            continue
        results[name] = [curve(run(args.recipe, args.out, name, overrides.split(), s, extra, args.steps, args.segment_steps,
                                   args.lock, args.segment_timeout), args.key) for s in args.seeds]
    if args.runs_only:
        return

    plot(results, args.key, args.plot or args.out / "success.png")
    baseline = args.baseline or list(variants)[-1]
    target = mean_curve(results[baseline])[-1]
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    lines = [f"| variant | overrides | {seeds} | mean final | first step (s) reaching {baseline}'s final {target[2]:.3f} "
             "| per seed: first step reaching it |",
             "| --- | --- | " + " | ".join("---" for _ in args.seeds) + " | --- | --- | --- |"]
    for name, curves in results.items():
        per_seed = " | ".join(f"{c[0][2]:.3f} -> {c[-1][2]:.3f}" for c in curves)
        m = mean_curve(curves)
        hit = first_reaching(m, target[2])
        reach = f"{hit[0]} ({hit[1]:.0f} s)" if hit else "not reached"
        # Each seed against the same target (the baseline's mean final), so the spread is visible.
        seed_hits = [first_reaching(c, target[2]) for c in curves]
        per_seed_reach = ", ".join(f"{h[0]} ({h[1]:.0f} s)" if h else "-" for h in seed_hits)
        lines.append(f"| {name} | `{variants[name] or '(recipe)'}` | {per_seed} | {m[-1][2]:.3f} | {reach} | {per_seed_reach} |")
    for name in variants:
        if name == baseline:
            continue
        hit = first_reaching(mean_curve(results[name]), target[2])
        if hit:
            lines.append(f"\n{name} reached {baseline}'s final mean success at step {hit[0]} of {target[0]} "
                         f"(step ratio {hit[0] / target[0]:.2f}) after {hit[1]:.0f} s of {target[1]:.0f} s "
                         f"(wall-clock ratio {hit[1] / target[1]:.2f}).")
        else:
            lines.append(f"\n{name} did not reach {baseline}'s final mean success within {target[0]} steps.")
    # Training seconds on a shared machine swing with the load; the median step time per variant is
    # the steadier estimate of what a step costs.
    medians = {name: statistics.median(r["time/step_s"] for s in args.seeds for r in rows(args.out / f"{name}-seed{s}")
                                       if "time/step_s" in r) for name in variants}
    lines.append("\nmedian seconds per training step: " + ", ".join(f"{n} {m:.2f}" for n, m in medians.items())
                 + "".join(f" ({n}/{baseline} = {m / medians[baseline]:.2f})" for n, m in medians.items() if n != baseline))
    table = "\n".join(lines)
    (args.summary or args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
