"""Learner-step throughput, ours against TRL's SDPOTrainer, same model, batch and settings, on CPU.

The work of one step: for every sample a no-grad teacher forward on teacher prompt + response, a
student forward/backward on prompt + response, the SDPO loss (JSD alpha 0.5 on the student's
top-100 with a tail bucket, rollout importance weights), AdamW with grad-norm clipping, and the
EMA teacher update. Generation is not part of it (TRL's trainer is fed the batch its generation
would have built; see benchmarks/learner/side_trl.py).

Sides (each its own process, stepped in turn so that machine load falls on all alike):
  trl            TRL 1.16 SDPOTrainer, micro-batches of --micro samples (padded), gradient accumulation
  ours-padded    our learner, micro-batches of --micro samples (padded), the default path
  ours-packed    our learner, padding-free rows of --budget tokens (learner.max_tokens_per_micro_batch)
  ours-packed-all  the same, but computing the samples without a teacher signal too (as TRL does;
                 pure SDPO skips them: their loss and gradient are exactly 0)

    .venv/bin/python benchmarks/learner/step.py --trl-python /tmp/venv-trl/bin/python
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/venv-trl/bin/python")
    p.add_argument("--shape", default="tiny-6m", choices=sorted(SHAPES))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--budget", type=int, default=None, help="packed tokens per micro-batch (default: micro x mean packed length)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (2 threads on a loaded 2-core machine spin-wait badly)")
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="learner-step-")
    model = build_model(a.shape, os.path.join(work, "model"))
    batch = make_batch(a.samples, SHAPES[a.shape]["vocab_size"], prompt_tokens=(30, 80), response_tokens=(16, 256),
                       demo_tokens=(16, 256))
    batch_path = os.path.join(work, "batch.json")
    save_batch(batch_path, batch)
    packed = [max(len(s["prompt_ids"]), len(s["teacher_prompt_ids"])) + len(s["response_ids"]) for s in batch]
    budget = a.budget or a.micro * sum(packed) // len(packed)
    ours = [sys.executable, os.path.join(HERE, "side_ours.py"), "--model", model, "--batch", batch_path,
            "--threads", str(a.threads)]
    specs = [
        ("trl", [a.trl_python, os.path.join(HERE, "side_trl.py"), "--model", model, "--batch", batch_path,
                 "--micro", str(a.micro), "--threads", str(a.threads)], os.path.join(work, "trl.log")),
        ("ours-padded", ours + ["--overrides", json.dumps([f"learner.samples_per_micro_batch={a.micro}"])],
         os.path.join(work, "ours-padded.log")),
        ("ours-packed", ours + ["--overrides", json.dumps([f"learner.max_tokens_per_micro_batch={budget}"])],
         os.path.join(work, "ours-packed.log")),
        # The same step computed on every sample (hybrid with a zero policy-gradient weight is SDPO's
        # loss and gradient without skipping the signal-less samples): packing's share of the gain.
        ("ours-packed-all", ours + ["--overrides", json.dumps([
            f"learner.max_tokens_per_micro_batch={budget}", "loss.objective=hybrid", "loss.pg_weight=0",
            "rollout.samples_per_prompt=2"])], os.path.join(work, "ours-packed-all.log")),
    ]
    with started(specs) as sides:
        load_before = load_average()
        results = interleave(sides, a.steps)
        load_after = load_average()

    tokens = token_counts(batch)
    print(f"model {a.shape}, {a.samples} samples, {tokens['forward']} forward tokens "
          f"({tokens['student']} student + {tokens['teacher']} teacher, {tokens['response']} response), "
          f"micro-batch {a.micro} samples / packed budget {budget} tokens, {a.threads} threads, {a.steps} interleaved steps")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}")
    trl_s = median_seconds(results["trl"])
    for name, records in results.items():
        s = median_seconds(records)
        print(f"  {name:15s} median {s:7.3f} s/step  {tokens['forward'] / s:9.0f} forward tok/s  "
              f"{tokens['response'] / s:7.0f} response tok/s  x{trl_s / s:5.2f} vs trl  "
              f"(micro-batches {records[0]['micro_batches']}, loss {records[-1]['loss']:.4f})")
    print(f"RATIO ours-packed / trl tokens/s = {trl_s / median_seconds(results['ours-packed']):.2f}")
    print(f"RATIO ours-packed-all / trl tokens/s = {trl_s / median_seconds(results['ours-packed-all']):.2f}")
    print(f"RATIO ours-padded / trl tokens/s = {trl_s / median_seconds(results['ours-padded']):.2f}")


if __name__ == "__main__":
    main()
