"""Build the GPU smoke model: a random-init Qwen2 of Qwen2.5-0.5B's shape (24 layers, hidden 896,
14 query / 2 KV heads of 64: real kernel shapes for flash-attn, CUDA graphs and the bucketed weight
sync) with the embedded tiny tokenizer, so it needs no hub and matches the arithmetic environment.
Random weights score ~0 reward: recipes/gpu_smoke.yaml checks that the GPU path runs, not learning.

    python benchmarks/gpu/make_model.py runs/gpu_smoke_model      # then: python -m sdpo.run recipes/gpu_smoke.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

QWEN25_05B_SHAPE = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                        num_key_value_heads=2, head_dim=64, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def build(path: str, seed: int = 0) -> str:
    import torch
    from transformers import Qwen2ForCausalLM

    from sdpo.tiny.model import tiny_generation_config, tiny_model_config
    from sdpo.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = tiny_model_config(len(tok))
    for key, value in QWEN25_05B_SHAPE.items():
        setattr(config, key, value)
    config.max_position_embeddings = 4096
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tiny_generation_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, vocab {len(tok)}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="runs/gpu_smoke_model")
    build(parser.parse_args().path)
