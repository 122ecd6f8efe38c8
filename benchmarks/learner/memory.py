"""Peak memory of one learner step against model size: TRL's SDPOTrainer, our learner (packed),
and our learner with the memory-lean options (packed + loss.chunk_tokens + activation
checkpointing), each in a fresh process, one after another, on the same batch.

Figures are resident memory (CPU): "resident" before the step (student, teacher, buffers), and
the high-water mark during the step, which includes AdamW's state (allocated by the first step)
and the step's activations, logits and gradients. Compare peaks: transformers 5.24 (TRL's
environment) leaves loaded weights in pages of the mmapped checkpoint that become resident only
when first touched, so TRL's "resident" before the step undercounts its weights. On a GPU, benchmarks/gpu/learner.py reports
torch.cuda.max_memory_allocated instead.

    .venv/bin/python benchmarks/learner/memory.py --trl-python /tmp/venv-trl/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import Side, build_model, load_average  # noqa: E402
from workload import SHAPES, make_batch, save_batch  # noqa: E402


def params_m(shape: str) -> float:
    c = SHAPES[shape]
    h, layers, inter, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return (layers * per_layer + v * h * (1 if c["tie_word_embeddings"] else 2)) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/venv-trl/bin/python")
    p.add_argument("--shapes", default="tiny-6m,tiny-20m,tiny-60m")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="learner-memory-")
    print(f"load average at start {load_average()}")
    rows = []
    for shape in a.shapes.split(","):
        model = build_model(shape, os.path.join(work, shape))
        batch = make_batch(a.samples, SHAPES[shape]["vocab_size"], prompt_tokens=(30, 80), response_tokens=(64, 512),
                           demo_tokens=(16, 256))
        batch_path = os.path.join(work, f"{shape}.json")
        save_batch(batch_path, batch)
        packed = [max(len(s["prompt_ids"]), len(s["teacher_prompt_ids"])) + len(s["response_ids"]) for s in batch]
        budget = a.micro * sum(packed) // len(packed)
        ours = [sys.executable, os.path.join(HERE, "side_ours.py"), "--model", model, "--batch", batch_path,
                "--threads", str(a.threads), "--overrides"]
        variants = {
            "trl": [a.trl_python, os.path.join(HERE, "side_trl.py"), "--model", model, "--batch", batch_path,
                    "--micro", str(a.micro), "--threads", str(a.threads)],
            "ours-packed": ours + [json.dumps([f"learner.max_tokens_per_micro_batch={budget}"])],
            "ours-lean": ours + [json.dumps([f"learner.max_tokens_per_micro_batch={budget}", "loss.chunk_tokens=256",
                                             "learner.activation_checkpointing=true"])],
        }
        for name, argv in variants.items():
            side = Side(name, argv, os.path.join(work, f"{shape}-{name}.log"))
            try:
                side.ask("reset_peak")
                before = side.ask("memory")
                side.ask("step")
                after = side.ask("memory")
            finally:
                side.close()
            rows.append(dict(shape=shape, params_m=params_m(shape), variant=name, resident_mib=before["rss_mib"],
                             peak_mib=after["rss_peak_mib"], step_mib=after["rss_peak_mib"] - before["rss_mib"]))
            r = rows[-1]
            print(f"  {shape:9s} {r['params_m']:6.1f}M params  {name:12s} resident {r['resident_mib']:7.0f} MiB  "
                  f"peak {r['peak_mib']:7.0f} MiB  step adds {r['step_mib']:6.0f} MiB", flush=True)
    print(f"load average at end {load_average()}")
    for shape in a.shapes.split(","):
        by = {r["variant"]: r for r in rows if r["shape"] == shape}
        print(f"RATIO {shape}: peak memory trl / ours-packed = {by['trl']['peak_mib'] / by['ours-packed']['peak_mib']:.2f}, "
              f"trl / ours-lean = {by['trl']['peak_mib'] / by['ours-lean']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
