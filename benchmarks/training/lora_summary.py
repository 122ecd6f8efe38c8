"""One row per run directory: held-out success by evaluation step, median step / learn / weight-sync
seconds, the learner/engine log-prob gap. For the LoRA vs full quickstart runs (RESULTS.md, "LoRA").

    python benchmarks/training/lora_summary.py RUN_DIR ... [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in rows if "eval/success_t" in r}
    steps = [r for r in rows if "time/step_s" in r]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in steps if key in r)

    return {"run": os.path.basename(run_dir.rstrip("/")),
            "success_t": {s: round(r["eval/success_t"], 3) for s, r in sorted(evals.items())},
            "success_greedy": {s: round(r["eval/success_greedy"], 3) for s, r in sorted(evals.items())},
            "step_s": median("time/step_s"), "learn_s": median("time/learn_s"), "weight_sync_s": median("time/weight_sync_s"),
            "generate_s": median("time/generate_s"), "logp_gap": median("learn/rollout_logp_gap_abs"),
            "total_s": sum(r["time/step_s"] for r in steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = [summary(r) for r in a.runs]
    print("| run | held-out T=1 by step | greedy first -> last | median step s | learn s | sync s | generate s | logp gap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = " ".join(f"{s}:{v:.3f}" for s, v in r["success_t"].items())
        g = list(r["success_greedy"].values())
        print(f"| {r['run']} | {t} | {g[0]:.3f} -> {g[-1]:.3f} | {r['step_s']:.2f} | {r['learn_s']:.2f} | "
              f"{r['weight_sync_s']:.3f} | {r['generate_s']:.2f} | {r['logp_gap']:.1e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
