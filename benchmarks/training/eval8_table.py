"""Held-out success before and after, re-evaluated with more samples per task: the last evaluation of
each run directory, as a markdown table with the gain per seed (RESULTS, "Multi-turn tool use").

    python benchmarks/training/eval8_table.py benchmarks/results/tools_cpu_v3/eval8 --variants routed60 grpo60 --seeds 0 1 2 3 4

DIR holds init-seedS (the starting model, `steps=0`) and VARIANT-seedS (a finished run resumed at its
last step, so that only the evaluation runs again).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from compare_objectives import rows  # this folder: the run directories' metrics


def last_eval(run_dir: Path) -> tuple[int, float]:
    evals = [r for r in rows(run_dir) if "eval/success_t" in r]
    return evals[-1]["step"], evals[-1]["eval/success_t"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = parser.parse_args()
    start = {s: last_eval(a.dir / f"init-seed{s}")[1] for s in a.seeds}
    print("| variant | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean (gain, sd of gains) | seeds above their start |")
    print("| --- " * (len(a.seeds) + 3) + "|")
    for variant in a.variants:
        end = {s: last_eval(a.dir / f"{variant}-seed{s}") for s in a.seeds}
        gains = [end[s][1] - start[s] for s in a.seeds]
        cells = [f"{start[s]:.3f} -> {end[s][1]:.3f} ({g:+.3f})" for s, g in zip(a.seeds, gains)]
        before, after = statistics.mean(start.values()), statistics.mean(e[1] for e in end.values())
        mean = f"{before:.3f} -> {after:.3f} ({statistics.mean(gains):+.3f}, {statistics.stdev(gains):.3f})"
        above = f"{sum(g > 0 for g in gains)} of {len(gains)}"
        print(f"| {variant} (step {end[a.seeds[0]][0]}) | " + " | ".join(cells) + f" | {mean} | {above} |")


if __name__ == "__main__":
    main()
