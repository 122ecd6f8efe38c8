"""The shared workload of the learner benchmarks: model shapes and a batch of SDPO samples.

Standard library only: the TRL side imports it from another virtual environment.
A batch is written once as JSON by the driver and read by every side, so all run the same tokens.
"""

from __future__ import annotations

import json
import random

# Random-init Qwen2 shapes. "tiny-*" for CPU; the Qwen2.5 ones are those models' published configs.
SHAPES: dict[str, dict] = {
    "tiny-6m": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=1024, tie_word_embeddings=False),
    "tiny-20m": dict(vocab_size=8192, hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=1536, tie_word_embeddings=False),
    "tiny-60m": dict(vocab_size=16384, hidden_size=640, num_hidden_layers=10, num_attention_heads=10,
                     num_key_value_heads=2, intermediate_size=2560, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
}


def model_config(shape: str) -> dict:
    return dict(SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, pad_token_id=0,
                eos_token_id=1, bos_token_id=None, use_cache=False)


def make_batch(samples: int, vocab: int, *, prompt_tokens: tuple[int, int], response_tokens: tuple[int, int],
               demo_tokens: tuple[int, int], seed: int = 0, signal_frac: float = 0.75) -> list[dict]:
    """SDPO samples as the learner receives them: each teacher prompt is the student prompt with a
    demonstration (a sibling's answer) spliced in, lengths uniform in the given ranges."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    batch = []
    for i in range(samples):
        prompt = ids(rng.randint(*prompt_tokens))
        response = ids(rng.randint(*response_tokens))
        signal = rng.random() < signal_frac
        teacher = prompt[:-3] + ids(rng.randint(*demo_tokens)) + prompt[-3:] if signal else list(prompt)
        batch.append(dict(prompt_ids=prompt, response_ids=response, teacher_prompt_ids=teacher, sd_mask=int(signal),
                          rollout_logprobs=[-rng.random() * 3 for _ in response]))
    return batch


def save_batch(path: str, batch: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(batch, f)


def load_batch(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def token_counts(batch: list[dict]) -> dict[str, int]:
    """Real (non-padding) tokens a learner step processes: both forwards' inputs, and the responses."""
    student = sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in batch)
    teacher = sum(len(s["teacher_prompt_ids"]) + len(s["response_ids"]) for s in batch)
    return dict(student=student, teacher=teacher, forward=student + teacher, response=sum(len(s["response_ids"]) for s in batch))


def step_flops(batch: list[dict], shape: str, recompute: bool = False) -> float:
    """Model FLOPs of one learner step (the usual accounting: 2 per weight per token forward, twice
    that backward; causal attention's QK^T and AV; the LM head only at response positions; no
    credit for recomputation). Teacher: forward only."""
    c = SHAPES[shape]
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    per_token_layer = 2 * (h * h * 2 + h * kv * 2 + 3 * h * inter)  # q, o, k, v, gate/up/down
    head = 2 * h * c["vocab_size"]
    total = 0.0
    for s in batch:
        for prompt, mult in ((s["prompt_ids"], 3), (s["teacher_prompt_ids"], 1)):  # student fwd+bwd, teacher fwd
            n = len(prompt) + len(s["response_ids"])
            attention = layers * 2 * 2 * h * n * n / 2  # QK^T and AV, causal half
            total += mult * (layers * per_token_layer * n + attention + head * len(s["response_ids"]))
    return total
