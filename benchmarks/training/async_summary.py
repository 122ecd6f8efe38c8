"""Summarize asynchronous runs (rollout.max_staleness = K) side by side: a markdown table of
wall-clock per step, the phases, held-out success at equal steps, the staleness histogram and the
rollout IS weights, read from each run's metrics.jsonl.

    python benchmarks/training/async_summary.py benchmarks/results/async/k0-seed0 benchmarks/results/async/k1-seed0 ...

With several seeds of one K, a second table gives each K's means over its seeds.

The runs themselves are plain `python -m sdpo.run recipes/quickstart.yaml seed=S steps=200 rollout.max_staleness=K
logging.run_dir=...`, one at a time (benchmarks/RESULTS.md gives the commands).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml


def summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    k = cfg["rollout"].get("max_staleness", 0)  # absent: a run from before the key (synchronous)
    steps = [r for r in rows if "learn/loss" in r]
    evals = {r["step"]: r for r in rows if "eval/success_t" in r}
    median = lambda key: statistics.median(r[key] for r in steps if key in r) if any(key in r for r in steps) else float("nan")  # noqa: E731
    staleness = {i: statistics.mean(r.get(f"rollout/staleness_frac_{i}", float(i == 0)) for r in steps) for i in range(k + 1)}
    return {
        "run": run_dir.name, "k": k, "seed": cfg["seed"], "steps": len(steps),
        "step_s": median("time/step_s"), "total_s": sum(r["time/step_s"] for r in steps),
        "phases": {p: median(f"time/{p}_s") for p in ("wait_for_batch", "generate", "verify", "teacher_contexts", "learn",
                                                     "weight_sync", "weight_load")},
        "success_t": {s: e["eval/success_t"] for s, e in sorted(evals.items())},
        "success_greedy": {s: e.get("eval/success_greedy") for s, e in sorted(evals.items())},
        "staleness": staleness, "staleness_max": max(r["rollout/policy_version_lag_max"] for r in steps),
        "is_weight_mean": statistics.mean(r["learn/is_weight_mean"] for r in steps),
        "is_weight_min": min(r["learn/is_weight_mean"] for r in steps),
        "logp_gap": statistics.mean(r["learn/rollout_logp_gap_abs"] for r in steps),
    }


def main(paths: list[str]) -> None:
    runs = [summary(Path(p)) for p in paths]
    print("| run | K | median step s | total s | median phases s (wait / gen / verify / ctx / learn / sync / load) | "
          "held-out T=1 by step | greedy final | staleness 0/1/2 (frac) | IS weight mean (min step) | logp gap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        phases = " / ".join("-" if v != v else f"{v:.2f}" for v in r["phases"].values())
        curve = " ".join(f"{s}:{v:.3f}" for s, v in r["success_t"].items())
        greedy = list(r["success_greedy"].values())[-1]  # None: the recipe evaluates at T=1 only
        greedy = "-" if greedy is None else f"{greedy:.3f}"
        stale = " / ".join(f"{v:.2f}" for v in r["staleness"].values())
        print(f"| {r['run']} | {r['k']} | {r['step_s']:.2f} | {r['total_s']:.0f} | {phases} | {curve} | "
              f"{greedy} | {stale} (max {r['staleness_max']:.0f}) | {r['is_weight_mean']:.4f} ({r['is_weight_min']:.4f}) | "
              f"{r['logp_gap']:.1e} |")
    means(runs)


def means(runs: list[dict]) -> None:
    """Per K, over its seeds: the final held-out success at equal steps and the seconds it took. Only
    evaluation steps every run of that K has are averaged, so a shorter run does not skew the curve."""
    by_k: dict[int, list[dict]] = {}
    for r in runs:
        by_k.setdefault(r["k"], []).append(r)
    if all(len(group) < 2 for group in by_k.values()):
        return
    print()
    print("| K | seeds | held-out T=1 by step (mean) | final T=1 mean (min - max) | greedy final mean (min - max) | "
          "median step s (mean) | total s (mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, group in sorted(by_k.items()):
        steps = sorted(set.intersection(*(set(r["success_t"]) for r in group)))
        curve = " ".join(f"{s}:{statistics.mean(r['success_t'][s] for r in group):.3f}" for s in steps)
        final = [r["success_t"][steps[-1]] for r in group]
        greedy = [g for g in (list(r["success_greedy"].values())[-1] for r in group) if g is not None]
        seeds = ", ".join(str(r["seed"]) for r in group)
        print(f"| {k} | {seeds} | {curve} | {statistics.mean(final):.3f} ({min(final):.3f} - {max(final):.3f}) | "
              f"{f'{statistics.mean(greedy):.3f} ({min(greedy):.3f} - {max(greedy):.3f})' if greedy else '-'} | "
              f"{statistics.mean(r['step_s'] for r in group):.2f} | {statistics.mean(r['total_s'] for r in group):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
