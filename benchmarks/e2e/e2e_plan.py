"""The shared workload of the end-to-end benchmark: what each size runs, on both sides.

Standard library only: TRL's side imports it from another virtual environment. The driver
(`bench.py`) writes one JSON plan per run (model folder, the prompts of every step in order, the
held-out prompts, the settings) and both sides read it, so they train on the same prompts in the
same order with the same settings.
"""

from __future__ import annotations

import json

# Every size: the arithmetic environment's prompts and byte-level tokenizer (vocabulary 260).
# "quickstart" is the quickstart itself (the cached warm-started tiny model, real rewards). The
# larger ones are random-init Qwen2s of that vocabulary: they never answer correctly, so every
# sample is counted a success (success_threshold 0) and gets a sibling's answer as its
# demonstration; both sides then distill on every sample, which is the work SDPO does per sample
# when most samples have a teacher signal. Random models rarely sample the stop token, so the
# responses run to (near) the length limit.
SIZES: dict[str, dict] = {
    "quickstart": dict(model="tiny-arithmetic", prompts=16, samples=8, max_tokens=8, lr=1e-4, ema=0.01,
                       success_threshold=0.5, micro=64, budget=8192),
    "20m": dict(model=dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                           intermediate_size=1536), prompts=4, samples=4, max_tokens=128, lr=1e-5, ema=0.05,
                success_threshold=0.0, micro=8, budget=8192),
    "100m": dict(model=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                            intermediate_size=3072), prompts=2, samples=4, max_tokens=256, lr=1e-5, ema=0.05,
                 success_threshold=0.0, micro=4, budget=8192),
}


def save_plan(path: str, plan: dict) -> None:
    with open(path, "w") as f:
        json.dump(plan, f)


def load_plan(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
