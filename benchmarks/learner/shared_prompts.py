"""One learner rank's compute on a quickstart-shaped micro-batch, padded vs packed vs packed with
shared prompts (learner.share_prompts), in one process without FSDP or Ray: teacher forward (no
grad) plus student forward and backward, 1 thread, medians of 7.

64 samples in 8 prompt groups (30-token prompts), 6-8 token responses, teacher prompts of 87 tokens
shared by 7 of each group's 8 siblings (the eighth, the demonstrator, is shown another answer), as
in a quickstart step's rank share.

    .venv/bin/python benchmarks/learner/shared_prompts.py
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from sdpo.learner.model import load_causal_lm, response_logits
from sdpo.learner.packing import PACKED_SDPA
from sdpo.models import resolve_model_path


def batch(seed: int = 0) -> tuple[list, list, list]:
    rng = random.Random(seed)
    prompts, teachers, responses = [], [], []
    for _ in range(8):
        prompt = [rng.randrange(200) for _ in range(30)]
        shown = [[rng.randrange(200) for _ in range(57)] + prompt for _ in range(2)]
        for k in range(8):
            prompts.append(prompt)
            teachers.append(shown[0 if k else 1])
            responses.append([rng.randrange(200) for _ in range(rng.randint(6, 8))])
    return prompts, teachers, responses


def main() -> None:
    torch.set_num_threads(1)
    path = resolve_model_path("tiny-arithmetic")
    prompts, teachers, responses = batch()
    cpu = torch.device("cpu")

    def step(model, packed: bool, share: bool) -> None:
        with torch.no_grad():
            teacher = response_logits(model, teachers, responses, cpu, packed, share)
        student = response_logits(model, prompts, responses, cpu, packed, share)
        (student.log_softmax(-1) * teacher.softmax(-1)).sum().backward()

    models = {name: load_causal_lm(path, name) for name in ("sdpa", PACKED_SDPA)}
    for name, attention, packed, share in [("padded", "sdpa", False, False), ("packed", PACKED_SDPA, True, False),
                                           ("shared", PACKED_SDPA, True, True)]:
        model = models[attention]
        step(model, packed, share)  # warm-up
        seconds = []
        for _ in range(7):
            begin = time.perf_counter()
            step(model, packed, share)
            seconds.append(time.perf_counter() - begin)
        print(f"{name}: {statistics.median(seconds) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
