"""Peak memory and time of the SDPO loss (forward + backward) for one long response at Qwen3's vocabulary.

Variants: "straightforward" (full (N, V) logits, then sdpo.loss.divergence_per_token), "chunked"
(sdpo.chunked_loss.chunked_divergence from hidden states), and "trl" (trl.experimental.sdpo's
loss functions on full logits, run with a separate venv's Python). Each measurement is a fresh
subprocess (benchmarks/loss/measure_one.py); value/gradient agreement is benchmarks/loss/agreement.py.

The straightforward path does not fit 8,192 tokens on a 24 GiB machine, so it is measured at the
sizes given by --straightforward-tokens and fitted with a line (peak = a + b N, which is exact for
it: every buffer is (N, V) or fixed); the 8,192-token figure for it is that line's, marked as
extrapolated. The chunked path is measured at 8,192 tokens.

    .venv/bin/python benchmarks/loss/memory.py --trl-python /tmp/venv-trl/bin/python
    .venv/bin/python benchmarks/loss/memory.py --summarize   # only re-print from the results file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results", "loss", "memory.jsonl")

CONFIGS = {
    # The paper's default distillation: alpha 0.5 (JSD), student top-100 with a tail bucket.
    "jsd_top100_tail": dict(alpha=0.5, topk="100", add_tail="true"),
    # Full vocabulary JSD: the heaviest straightforward case.
    "jsd_full_vocab": dict(alpha=0.5, topk="none", add_tail="true"),
}


def measure(python: str, variant: str, tokens: int, config: str, args) -> dict:
    cfg = CONFIGS[config]
    cmd = [
        python, "-W", "ignore", os.path.join(HERE, "measure_one.py"),
        "--variant", variant, "--tokens", str(tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
        "--dtype", args.dtype, "--alpha", str(cfg["alpha"]), "--topk", cfg["topk"], "--add-tail", cfg["add_tail"],
        "--chunk-tokens", str(args.chunk_tokens),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "tokens": tokens, "config": config, "error": proc.stderr.strip()[-500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["config"] = config
    return result


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def summarize(rows: list[dict], target_tokens: int) -> None:
    for config in CONFIGS:
        sel = [r for r in rows if r.get("config") == config and "error" not in r]
        if not sel:
            continue
        print(f"\n== {config} ==")
        print(f"{'variant':16} {'tokens':>6} {'peak MiB':>9} {'seconds':>8} {'loss':>12}")
        for r in sorted(sel, key=lambda r: (r["variant"], r["tokens"])):
            print(f"{r['variant']:16} {r['tokens']:>6} {r['peak_mib']:>9.0f} {r['seconds']:>8.1f} {r['loss']:>12.6g}")
        for variant in ("straightforward", "trl"):
            pts = sorted({(r["tokens"], r["peak_mib"]) for r in sel if r["variant"] == variant})
            if len(pts) < 2:
                continue
            a, b = _fit(pts)
            at = [r for r in sel if r["variant"] == variant and r["tokens"] == target_tokens]
            peak = at[0]["peak_mib"] if at else a + b * target_tokens
            how = "measured" if at else f"extrapolated from {[p[0] for p in pts]} tokens"
            print(f"{variant}: peak = {a:.0f} MiB + {b:.3f} MiB/token; at {target_tokens} tokens {peak:.0f} MiB ({how})")
            chunked = [r for r in sel if r["variant"] == "chunked"]
            for c in sorted(chunked, key=lambda r: r["tokens"]):
                same = [r for r in sel if r["variant"] == variant and r["tokens"] == c["tokens"]]
                ref = same[0]["peak_mib"] if same else a + b * c["tokens"]
                tag = "measured" if same else "extrapolated"
                print(f"  chunked/{variant} at {c['tokens']} tokens: {c['peak_mib']:.0f} / {ref:.0f} MiB ({tag}) "
                      f"= {c['peak_mib'] / ref:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="the response length to report at")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--configs", default="jsd_top100_tail,jsd_full_vocab")
    p.add_argument("--straightforward-tokens", default="1024,2048,4096", help="per config: name=a,b or one list for all")
    p.add_argument("--chunked-tokens", default="1024,8192")
    p.add_argument("--trl-tokens", default="1024,2048")
    p.add_argument("--trl-python", default=None, help="Python of a venv with trl installed; omitted: no TRL rows")
    p.add_argument("--summarize", action="store_true", help="only print the summary of the results file")
    args = p.parse_args()

    if not args.summarize:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        plan = []
        for config in args.configs.split(","):
            for variant, sizes, python in (
                ("straightforward", args.straightforward_tokens, sys.executable),
                ("chunked", args.chunked_tokens, sys.executable),
                ("trl", args.trl_tokens, args.trl_python),
            ):
                if python is None:
                    continue
                for part in sizes.split(";"):
                    name, _, lst = part.rpartition("=")
                    if name and name != config:
                        continue
                    plan += [(python, variant, int(t), config) for t in lst.split(",") if t]
        for python, variant, tokens, config in plan:
            row = measure(python, variant, tokens, config, args)
            print(json.dumps(row), flush=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")

    with open(RESULTS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    summarize(rows, args.tokens)


if __name__ == "__main__":
    main()
