"""SDPO learner step on one GPU: tokens/s and model FLOPs utilisation, ours against TRL's SDPOTrainer.

Random-init models of the Qwen2.5-0.5B and Qwen2.5-1.5B shapes (built in code: no hub), bf16
compute with fp32 master weights on both sides, the same batch (responses of 100 to 2,000 tokens,
teacher prompts with a demonstration), the paper's distillation (JSD alpha 0.5, top-100 + tail),
EMA teacher, AdamW. Each side runs in its own process and they step in turn (see
benchmarks/learner/harness.py); generation is not timed (TRL is fed the batch its generation would
have built).

Ours: one FSDP2 rank, padding-free rows of --budget tokens, chunked LM head + divergence.
TRL: micro-batches of --micro samples, padded, gradient accumulation. Skipped, with a note, when
`trl` does not import in this Python. The device machine has neither TRL nor pydantic (which
sdpo.config needs): carry as wheels pydantic, pydantic-core, annotated-types, typing-inspection
(ours) and trl, datasets, dill, multiprocess (TRL). Our side needs no Ray (sdpo.learner.micro_batches
and the worker import none).

MFU = model FLOPs of the step (benchmarks/learner/workload.py:step_flops, the same count for both
sides; no credit for recomputation) / (seconds x --peak-tflops, H200 dense bf16 989 by default).

    python benchmarks/gpu/learner.py                        # on the GPU machine (< 8 minutes)
    .venv/bin/python benchmarks/gpu/learner.py --device cpu --tiny --trl-python /tmp/venv-trl/bin/python   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNER = os.path.join(HERE, "..", "learner")
sys.path.insert(0, LEARNER)

from harness import build_model, interleave, load_average, median_seconds, started  # noqa: E402
from workload import SHAPES, make_batch, save_batch, step_flops, token_counts  # noqa: E402


def trl_importable(python: str) -> bool:
    return subprocess.run([python, "-c", "import trl.experimental.sdpo"], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="smoke test: a tiny model and batch")
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--budget", type=int, default=16384, help="our packed tokens per micro-batch")
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--trl-python", default=sys.executable)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    a = p.parse_args()
    if a.tiny:
        a.shapes, a.samples, a.micro, a.budget, a.chunk_tokens, a.steps = "tiny-6m", 8, 4, 1024, 256, 1

    work = tempfile.mkdtemp(prefix="gpu-learner-")
    with_trl = trl_importable(a.trl_python)
    if not with_trl:
        print(f"NOTE: trl does not import in {a.trl_python}: measuring ours only")
    bf16 = a.device == "cuda"
    rows = []
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "learner_cpu_smoke.json" if a.device == "cpu" else "learner.json")
    for shape in a.shapes.split(","):
        model = build_model(shape, os.path.join(work, shape), save_dtype="bfloat16" if bf16 else "float32")
        lengths = dict(prompt_tokens=(50, 200), response_tokens=(100, 2000), demo_tokens=(100, 1000))
        if a.tiny:
            lengths = dict(prompt_tokens=(20, 60), response_tokens=(16, 200), demo_tokens=(16, 100))
        batch = make_batch(a.samples, SHAPES[shape]["vocab_size"], **lengths)
        batch_path = os.path.join(work, f"{shape}.json")
        save_batch(batch_path, batch)
        overrides = [f"learner.max_tokens_per_micro_batch={a.budget}", f"loss.chunk_tokens={a.chunk_tokens}"]
        if bf16:
            overrides.append("learner.mixed_precision=bf16")
        specs = []
        if with_trl:
            specs.append(("trl", [a.trl_python, os.path.join(LEARNER, "side_trl.py"), "--model", model, "--batch", batch_path,
                                  "--micro", str(a.micro), "--device", a.device] + (["--bf16"] if bf16 else []),
                          os.path.join(work, f"{shape}-trl.log")))
        specs.append(("ours", [sys.executable, os.path.join(LEARNER, "side_ours.py"), "--model", model, "--batch", batch_path,
                               "--device", a.device, "--overrides", json.dumps(overrides)],
                      os.path.join(work, f"{shape}-ours.log")))
        with started(specs) as sides:
            for side in sides:
                side.ask("reset_peak")
            load = load_average()
            results = interleave(sides, a.steps)
            memory = {side.name: side.ask("memory") for side in sides}
        tokens, flops = token_counts(batch), step_flops(batch, shape)
        for name, records in results.items():
            s = median_seconds(records)
            row = dict(shape=shape, side=name, seconds=s, forward_tok_s=tokens["forward"] / s, response_tok_s=tokens["response"] / s,
                       mfu=flops / s / (a.peak_tflops * 1e12), micro_batches=records[0]["micro_batches"], loss=records[-1]["loss"],
                       peak_mib=memory[name].get("cuda_peak_mib", memory[name]["rss_peak_mib"]), load_average=load, **tokens)
            rows.append(row)
            print(f"{shape:13s} {name:5s} {s:8.3f} s/step  {row['forward_tok_s']:10.0f} forward tok/s  MFU {100 * row['mfu']:5.1f}%  "
                  f"peak {row['peak_mib']:8.0f} MiB  ({row['micro_batches']} micro-batches, "
                  f"{tokens['forward']} forward tokens)", flush=True)
        if with_trl:
            by = {r["side"]: r for r in rows if r["shape"] == shape}
            print(f"RATIO {shape}: ours / trl tokens/s = {by['trl']['seconds'] / by['ours']['seconds']:.2f}")
        with open(path, "w") as f:  # after every shape: a timeout later keeps what was measured
            json.dump(rows, f, indent=1)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
