"""Value and gradient agreement: chunked vs straightforward (ours), and TRL's SDPO loss vs ours.

Prints one JSON line. Needs only torch and the repo for the first part; the TRL part runs when
``trl.experimental.sdpo`` imports (run this file with the Python of a venv that has trl; our code
is imported from the repo by path, so it needs nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sdpo.chunked_loss import chunked_divergence  # noqa: E402
from sdpo.loss import (  # noqa: E402
    aggregate,
    divergence_per_token,
    off_policy_is_weights,
    token_level_distillation,
    token_logprobs,
)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def chunked_vs_straightforward(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, chunk_tokens: int, cfg: dict) -> dict:
    g = torch.Generator().manual_seed(1)
    scale = 3.0 / hidden**0.5
    hs = torch.randn(tokens, hidden, generator=g).to(dtype)
    ht = (hs.float() + 0.3 * torch.randn(tokens, hidden, generator=g)).to(dtype)
    ws = (torch.randn(vocab, hidden, generator=g) * scale).to(dtype)
    wt = (ws.float() + 0.1 * scale * torch.randn(vocab, hidden, generator=g)).to(dtype)
    weights = torch.rand(tokens, generator=g)

    def run(chunked: bool):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if chunked:
            per_token = chunked_divergence(h, ht, w, wt, chunk_tokens=chunk_tokens, **cfg).per_token
        else:
            per_token = divergence_per_token(F.linear(h, w), F.linear(ht, wt), **cfg)
        loss = (per_token * weights).sum() / tokens
        loss.backward()
        return per_token.detach(), loss.detach(), h.grad, w.grad

    ref, lazy = run(False), run(True)
    return {
        "tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "chunk_tokens": chunk_tokens, **cfg,
        "loss": float(ref[1]),
        "max_abs_diff_loss": _max_abs(ref[1], lazy[1]),
        "max_abs_diff_per_token": _max_abs(ref[0], lazy[0]),
        "max_abs_diff_grad_hidden": _max_abs(ref[2], lazy[2]),
        "max_abs_grad_hidden": float(ref[2].abs().max()),
        "max_abs_diff_grad_lm_head": _max_abs(ref[3], lazy[3]),
        "max_abs_grad_lm_head": float(ref[3].abs().max()),
    }


def trl_vs_ours(tokens_per_seq: int, seqs: int, vocab: int, dtype: torch.dtype) -> list[dict]:
    from trl.experimental.sdpo import loss_utils as trl

    g = torch.Generator().manual_seed(2)
    n = tokens_per_seq * seqs
    student0 = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    teacher = (student0.float() + torch.randn(n, vocab, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (n,), generator=g)
    noise = torch.randn(n, generator=g, dtype=torch.float64).to(dtype if dtype == torch.float64 else torch.float32)
    old_logp = token_logprobs(student0, ids) + 0.5 * noise
    seq_index = torch.arange(seqs).repeat_interleave(tokens_per_seq)
    ones = torch.ones(n, dtype=dtype)

    def trl_aggregate(per_token):
        # TRL SDPOTrainer._compute_self_distillation_loss: per-sequence token mean, then batch mean.
        per_seq = per_token.reshape(seqs, tokens_per_seq)
        return (per_seq.sum(-1) / tokens_per_seq).mean()

    def ours_aggregate(per_token):
        return aggregate(per_token, ones, seq_index, torch.ones(seqs), mode="sequence_mean", total_sequences=seqs, total_tokens=n)

    cases = []
    settings = [
        ("full_logits", dict(alpha=0.0, topk=None, add_tail=True)),
        ("full_logits", dict(alpha=0.5, topk=None, add_tail=True)),
        ("full_logits", dict(alpha=1.0, topk=None, add_tail=True)),
        ("topk_logits", dict(alpha=0.5, topk=100, add_tail=True)),
        ("topk_logits", dict(alpha=1.0, topk=100, add_tail=True)),
        ("topk_logits", dict(alpha=0.5, topk=100, add_tail=False)),
        ("topk_logits+is_clip", dict(alpha=0.5, topk=100, add_tail=True)),
        ("sampled_token", dict(alpha=1.0, topk=None, add_tail=True)),
    ]
    for mode, cfg in settings:
        results = []
        for side in ("trl", "ours"):
            x = student0.clone().requires_grad_(True)
            if mode == "sampled_token":
                if side == "trl":
                    per_token = trl.compute_sampled_token_self_distillation_loss(x, teacher, ids, distillation_alpha=1.0)
                else:
                    per_token = token_level_distillation(token_logprobs(x, ids), token_logprobs(teacher, ids), alpha=1.0)
            elif side == "trl":
                if cfg["topk"] is None:
                    per_token = trl.compute_full_logit_self_distillation_loss(x, teacher, distillation_alpha=cfg["alpha"])
                else:
                    per_token = trl.compute_topk_self_distillation_loss(
                        x, teacher, distillation_topk=cfg["topk"], distillation_alpha=cfg["alpha"], distillation_add_tail=cfg["add_tail"]
                    )
                if mode.endswith("is_clip"):
                    student_logp = torch.log_softmax(x, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                    per_token = trl.apply_importance_sampling_clipping(per_token, student_logp, old_logp, 2.0)
            else:
                per_token = divergence_per_token(x, teacher, **cfg)
                if mode.endswith("is_clip"):
                    per_token = per_token * off_policy_is_weights(token_logprobs(x, ids), old_logp, 2.0)
            loss = trl_aggregate(per_token) if side == "trl" else ours_aggregate(per_token)
            loss.backward()
            results.append((per_token.detach(), loss.detach(), x.grad))
        (tp, tl, tg), (op, ol, og) = results
        cases.append({
            "mode": mode, **cfg, "dtype": str(dtype).replace("torch.", ""), "tokens": n, "vocab": vocab,
            "loss": float(ol),
            "max_abs_diff_loss": _max_abs(tl, ol),
            "max_abs_diff_per_token": _max_abs(tp, op),
            "max_abs_diff_grad_logits": _max_abs(tg, og),
            "max_abs_grad_logits": float(og.abs().max()),
        })
    return cases


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk-tokens", type=int, default=512)
    args = p.parse_args()
    out = {"chunked_vs_straightforward": [], "trl_vs_ours": None, "torch": torch.__version__}
    for dtype in (torch.float32, torch.bfloat16):
        for cfg in (dict(alpha=0.5, topk=100, add_tail=True), dict(alpha=0.5, topk=None, add_tail=True)):
            out["chunked_vs_straightforward"].append(
                chunked_vs_straightforward(args.tokens, args.vocab, args.hidden, dtype, args.chunk_tokens, cfg)
            )
    try:
        import trl

        out["trl_version"] = trl.__version__
        out["trl_vs_ours"] = trl_vs_ours(16, 4, args.vocab, torch.float32) + trl_vs_ours(16, 4, args.vocab, torch.float64)
    except ImportError as e:
        out["trl_vs_ours"] = f"skipped: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
