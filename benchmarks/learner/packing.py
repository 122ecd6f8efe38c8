"""Packing against padding: our learner step on a batch whose sequence lengths spread from about
50 to 2,000 tokens, with padded micro-batches of --micro samples against padding-free rows of the
same average size (learner.max_tokens_per_micro_batch), stepped in turn in two processes.

Padding costs twice: every row of a padded micro-batch is as long as its longest sample, and the
LM head runs on every padded position; packing runs only real tokens (attention per sample).

    .venv/bin/python benchmarks/learner/packing.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import build_model, interleave, load_average, median_seconds, started  # noqa: E402
from workload import SHAPES, make_batch, save_batch, token_counts  # noqa: E402


def padded_tokens(batch: list[dict], micro: int) -> int:
    """Positions a padded step computes: each micro-batch's rows padded to its longest sample."""
    total = 0
    for i in range(0, len(batch), micro):
        chunk = batch[i : i + micro]
        for key in ("prompt_ids", "teacher_prompt_ids"):
            total += len(chunk) * max(len(s[key]) + len(s["response_ids"]) for s in chunk)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny-6m", choices=sorted(SHAPES))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="packing-")
    model = build_model(a.shape, os.path.join(work, "model"))
    # Student sequences of ~50 to ~2,000 tokens: short prompts, responses from a few words to long reasoning.
    batch = make_batch(a.samples, SHAPES[a.shape]["vocab_size"], prompt_tokens=(20, 100), response_tokens=(30, 1900),
                       demo_tokens=(20, 300), seed=1)
    batch_path = os.path.join(work, "batch.json")
    save_batch(batch_path, batch)
    lengths = sorted(len(s["prompt_ids"]) + len(s["response_ids"]) for s in batch)
    packed = [max(len(s["prompt_ids"]), len(s["teacher_prompt_ids"])) + len(s["response_ids"]) for s in batch]
    budget = a.micro * sum(packed) // len(packed)
    ours = [sys.executable, os.path.join(HERE, "side_ours.py"), "--model", model, "--batch", batch_path,
            "--threads", str(a.threads)]
    specs = [("padded", ours + ["--overrides", json.dumps([f"learner.samples_per_micro_batch={a.micro}"])],
              os.path.join(work, "padded.log")),
             ("packed", ours + ["--overrides", json.dumps([f"learner.max_tokens_per_micro_batch={budget}"])],
              os.path.join(work, "packed.log"))]
    with started(specs) as sides:
        load_before = load_average()
        results = interleave(sides, a.steps)
        load_after = load_average()

    tokens = token_counts(batch)
    print(f"model {a.shape}, {a.samples} samples, student lengths {lengths[0]}..{lengths[-1]} tokens, "
          f"{tokens['forward']} real forward tokens; padded micro-batches of {a.micro} samples compute "
          f"{padded_tokens(batch, a.micro)} positions; packed budget {budget} tokens; {a.threads} thread(s), {a.steps} interleaved steps")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}")
    for name, records in results.items():
        s = median_seconds(records)
        print(f"  {name:7s} median {s:7.2f} s/step  {tokens['forward'] / s:8.0f} real tok/s  "
              f"(micro-batches {records[0]['micro_batches']}, loss {records[-1]['loss']:.3e})")
    print(f"RATIO packed / padded tokens/s = {median_seconds(results['padded']) / median_seconds(results['packed']):.2f}")


if __name__ == "__main__":
    main()
