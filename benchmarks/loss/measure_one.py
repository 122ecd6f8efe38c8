"""Peak memory and time of one loss variant (forward + backward) in this fresh process.

Run by benchmarks/loss/memory.py, one subprocess per measurement, so that no allocator cache or
earlier peak leaks between variants. Prints one JSON line.

Peak memory is the process's resident high-water mark (VmHWM) during the loss, minus the resident
size just before it: the inputs (hidden states, LM-head weights) are allocated first, then the
high-water mark is reset through /proc/self/clear_refs, so the figure is what the loss itself adds
(logits, log-probs, autograd buffers, gradients of hidden states and LM head).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repo, for sdpo.loss

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _loss_fn(variant: str, args):
    if variant == "straightforward":
        from sdpo.loss import divergence_per_token

        def run(hs, ht, ws, wt):
            with torch.no_grad():
                teacher_logits = F.linear(ht, wt)
            per_token = divergence_per_token(F.linear(hs, ws), teacher_logits, alpha=args.alpha, topk=args.topk, add_tail=args.add_tail)
            return per_token

        return run
    if variant == "chunked":
        from sdpo.chunked_loss import chunked_divergence

        def run(hs, ht, ws, wt):
            return chunked_divergence(hs, ht, ws, wt, alpha=args.alpha, topk=args.topk, add_tail=args.add_tail,
                                      chunk_tokens=args.chunk_tokens).per_token

        return run
    if variant == "trl":
        from trl.experimental.sdpo.loss_utils import (
            compute_full_logit_self_distillation_loss,
            compute_topk_self_distillation_loss,
        )

        def run(hs, ht, ws, wt):
            # TRL's trainer hands these functions the model's logits as they come (here in the
            # model dtype); it does not upcast them itself.
            with torch.no_grad():
                teacher_logits = F.linear(ht, wt)
            student_logits = F.linear(hs, ws)
            if args.topk is None:
                return compute_full_logit_self_distillation_loss(student_logits, teacher_logits, distillation_alpha=args.alpha)
            return compute_topk_self_distillation_loss(
                student_logits, teacher_logits, distillation_topk=args.topk, distillation_alpha=args.alpha,
                distillation_add_tail=args.add_tail
            )

        return run
    raise SystemExit(f"unknown variant {variant!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True, choices=["straightforward", "chunked", "trl"])
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--topk", type=lambda s: None if s == "none" else int(s), required=True)
    p.add_argument("--add-tail", type=lambda s: s == "true", required=True)
    p.add_argument("--chunk-tokens", type=int, default=512)
    args = p.parse_args()

    dtype = DTYPES[args.dtype]
    run = _loss_fn(args.variant, args)
    g = torch.Generator().manual_seed(0)
    # Scales chosen so logits have a spread like a trained LM's (std ~3): hidden ~N(0,1), W ~N(0, 3/sqrt(H)).
    scale = 3.0 / args.hidden**0.5
    hs = torch.randn(args.tokens, args.hidden, generator=g).to(dtype).requires_grad_(True)
    ht = (hs.detach().float() + 0.3 * torch.randn(args.tokens, args.hidden, generator=g)).to(dtype)
    ws = (torch.randn(args.vocab, args.hidden, generator=g) * scale).to(dtype).requires_grad_(True)
    wt = (ws.detach().float() + 0.1 * scale * torch.randn(args.vocab, args.hidden, generator=g)).to(dtype)
    weights = torch.rand(args.tokens, generator=g)

    # Warm-up on 4 tokens: lazy kernel initialization should not count as the loss's time.
    hs_small = hs.detach()[:4].clone().requires_grad_(True)
    (run(hs_small, ht[:4], ws, wt) * weights[:4]).sum().backward()
    ws.grad = None
    del hs_small

    gc.collect()
    _reset_peak()
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    per_token = run(hs, ht, ws, wt)
    loss = (per_token * weights.to(per_token.dtype)).sum() / args.tokens
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - rss_before
    print(json.dumps({
        "variant": args.variant, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
        "dtype": args.dtype, "alpha": args.alpha, "topk": args.topk, "add_tail": args.add_tail,
        "chunk_tokens": args.chunk_tokens if args.variant == "chunked" else None,
        "peak_mib": round(peak / 1024, 1), "seconds": round(seconds, 2), "loss": float(loss),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
