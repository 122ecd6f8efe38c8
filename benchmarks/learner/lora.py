"""LoRA against full fine-tuning on one learner rank (CPU): peak memory of a step, step time, and
what a weight sync moves (bytes and seconds): the merged full weights written as the shm file,
against the adapter folder that adapter-only sync sends.

Each variant runs in a fresh process (its own memory high-water mark), on the same random-init
model and the same SDPO batch (EMA teacher: a second full model for full fine-tuning, a second set
of adapters for LoRA).

    .venv/bin/python benchmarks/learner/lora.py --shape tiny-60m --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..")]

from harness import build_model  # noqa: E402
from workload import SHAPES, make_batch, save_batch  # noqa: E402

LORA = ["model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=32"]
LEAN = ["loss.chunk_tokens=256", "learner.activation_checkpointing=true"]  # activations small: model state shows
VARIANTS = {"full": [], "lora-r16": LORA, "full-lean": LEAN, "lora-r16-lean": LORA + LEAN}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(a) -> None:
    import torch

    from sdpo.batch import TrainSample
    from sdpo.learner.micro_batches import rank_plans
    from sdpo.learner.objective import Totals
    from sdpo.learner.worker import LearnerWorker
    from sdpo.recipe import load_config

    with open(a.batch) as f:
        batch = [TrainSample(s["prompt_ids"], s["response_ids"], s["rollout_logprobs"], s["teacher_prompt_ids"], s["sd_mask"])
                 for s in json.load(f)]
    cfg = load_config(None, ["learner.world_size=1", f"learner.torch_threads_per_rank={a.threads}", "prompts_per_step=1",
                             "rollout.samples_per_prompt=1", "optimizer.warmup_steps=0", "learner.samples_per_micro_batch=4",
                             *VARIANTS[a.child]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(0, 1, cfg.model_dump_json(), a.model)
    worker.setup("127.0.0.1", port)
    trained = sum(p.numel() for p in worker.student.parameters() if p.requires_grad)
    micros = rank_plans(batch, 1, cfg)[0]
    totals = Totals.of(batch)
    resident = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: the peak from here on is the steps'
    times = []
    for _ in range(a.steps):
        started = time.perf_counter()
        worker.train_step(micros, totals)
        times.append(time.perf_counter() - started)
    peak = _status_mib("VmHWM")
    directory = tempfile.mkdtemp(prefix="lora-bench-", dir="/dev/shm")
    try:
        started = time.perf_counter()
        path = worker.export_weights(directory, 1)  # the merged (or full) weights as the shm file
        merged_s, merged_bytes = time.perf_counter() - started, os.path.getsize(path)
        adapter_s = adapter_bytes = None
        if worker.lora is not None:
            started = time.perf_counter()
            payload = worker.adapter_payload()
            adapter_s, adapter_bytes = time.perf_counter() - started, len(payload["adapter_model.safetensors"])
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    worker.shutdown()
    print("RESULT " + json.dumps(dict(variant=a.child, trained_params=trained, resident_mib=resident, peak_mib=peak,
                                      step_s=statistics.median(times), step_s_all=times, full_sync_bytes=merged_bytes,
                                      full_sync_s=merged_s, adapter_sync_bytes=adapter_bytes, adapter_sync_s=adapter_s,
                                      torch=torch.__version__)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny-60m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="full,lora-r16")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--batch", default=None)
    a = p.parse_args()
    if a.child:
        return child(a)
    work = tempfile.mkdtemp(prefix="lora-bench-")
    model = build_model(a.shape, os.path.join(work, a.shape))
    batch_path = os.path.join(work, "batch.json")
    save_batch(batch_path, make_batch(a.samples, SHAPES[a.shape]["vocab_size"], prompt_tokens=(30, 80),
                                      response_tokens=(64, 256), demo_tokens=(16, 128)))
    rows = []
    for variant in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--model", model, "--batch", batch_path,
                              "--steps", str(a.steps), "--threads", str(a.threads)], capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
        rows.append(dict(json.loads(line[len("RESULT "):]), shape=a.shape))
        print(json.dumps(rows[-1]), flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
