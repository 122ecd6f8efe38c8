"""The per-token SDPO objective (SPEC sections 3 and 4).

Only tensors in, tensors out: nothing here knows about models, environments or tokenizers. All
math runs in at least float32 (float64 inputs stay float64, which the gradient tests rely on),
because bf16 log-probs are too coarse for divergences between two nearly equal distributions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """Log-probability of ``ids`` under ``logits``: (..., V), (...) -> (...)."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    return logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def _tail_bucket(topk_logp: Tensor) -> Tensor:
    # log(1 - sum_k p) = log(-expm1(logsumexp)). The min with -1e-7 keeps it finite when the k
    # entries already hold (numerically) all the mass.
    lse = torch.logsumexp(topk_logp, dim=-1, keepdim=True)
    return torch.log(-torch.expm1(torch.clamp(lse, max=-1e-7)))


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probs; entries with p = 0 contribute 0."""
    terms = torch.exp(log_p) * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(-1)


def divergence_per_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    topk: int | None,
    add_tail: bool,
) -> Tensor:
    """Per-position divergence between student and teacher: (N, V), (N, V) -> (N,).

    alpha == 0: KL(P_T || P_S); alpha == 1: KL(P_S || P_T); otherwise the generalized JSD
    (1-a) KL(P_S || M) + a KL(P_T || M) with M = (1-a) P_S + a P_T. The endpoints are their own
    branches, not limits of the mixture.

    With ``topk`` the support is the student's top-k ids at each position (chosen without grad);
    both sides are normalized over the full vocabulary first, then either get a tail bucket holding
    the remaining mass (``add_tail``) or are renormalized over the k entries. ``topk`` None, or
    ``topk >= V`` (no token is left out, so a tail would be empty), means the full vocabulary.

    The teacher is detached here; gradients reach every student logit through the normalization.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"loss.alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    dtype = _compute_dtype(student_logits)
    log_s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().to(dtype), dim=-1)

    vocab = log_s.shape[-1]
    if topk is not None and topk < vocab:
        if topk <= 0:
            raise ValueError(f"loss.topk must be positive, got {topk}")
        idx = torch.topk(log_s.detach(), topk, dim=-1).indices
        log_s = log_s.gather(-1, idx)
        log_t = log_t.gather(-1, idx)
        if add_tail:
            log_s = torch.cat([log_s, _tail_bucket(log_s)], dim=-1)
            log_t = torch.cat([log_t, _tail_bucket(log_t)], dim=-1)
        else:
            log_s = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
            log_t = log_t - torch.logsumexp(log_t, dim=-1, keepdim=True)

    if alpha == 0.0:
        return _kl(log_t, log_s)
    if alpha == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1.0 - alpha), log_t + math.log(alpha)]), dim=0)
    return (1.0 - alpha) * _kl(log_s, log_m) + alpha * _kl(log_t, log_m)


@torch.no_grad()
def rollout_is_weights(learner_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(exp(clamp(learner - rollout, -20, 20)), cap), detached.

    Corrects for the rollout engine's numerics differing from the learner's; the clamp keeps exp
    finite for tokens where the two disagree wildly.
    """
    diff = learner_logp.to(_compute_dtype(learner_logp)) - rollout_logp.to(_compute_dtype(rollout_logp))
    return torch.clamp(torch.exp(torch.clamp(diff, -20.0, 20.0)), max=cap)


def aggregate(
    per_token_loss: Tensor,
    token_weight: Tensor,
    seq_index: Tensor,
    sd_mask: Tensor,
    *,
    mode: str,
    total_sequences: int,
    total_tokens: int,
) -> Tensor:
    """This micro-batch's share of the batch loss (SPEC section 4).

    Inputs cover the N response tokens of the S sequences in this micro-batch (whole sequences, no
    padding): ``per_token_loss`` (N,), ``token_weight`` (N,) = IS weights times any token mask (0
    for excluded tokens), ``seq_index`` (N,) long in [0, S), ``sd_mask`` (S,).

    "sequence_mean": sum_i sd_mask_i * (sum_{t in i} w_t loss_t) / max(1, sd_mask_i * T_i), divided
        by ``total_sequences`` = B, the number of sequences in the whole batch over all micro-batches
        and ranks, sd_mask=0 ones included. T_i is the response length of sequence i: every one of
        its tokens in ``seq_index`` counts, including those whose weight is 0 (a token mask such as
        the entropy quantile lowers the numerator, not the denominator).
    "token_mean": sum_t sd_mask[seq_t] * w_t * loss_t / ``total_tokens``, the global count of response
        tokens of sd_mask=1 sequences (again counting zero-weight tokens). A batch with no such
        token gives 0.

    Because both normalizers are global, summing the returned values over micro-batches and ranks
    gives the full-batch loss exactly, however the batch is split.
    """
    dtype = _compute_dtype(per_token_loss)
    weighted = per_token_loss.to(dtype) * token_weight.to(dtype)
    seq_index = seq_index.long()
    mask = sd_mask.to(dtype)

    if mode == "sequence_mean":
        if total_sequences < 1:
            raise ValueError(f"aggregate: total_sequences must be >= 1, got {total_sequences}")
        n_seq = mask.shape[0]
        seq_sum = torch.zeros(n_seq, dtype=dtype, device=weighted.device).index_add(0, seq_index, weighted)
        seq_len = torch.zeros(n_seq, dtype=dtype, device=weighted.device).index_add(
            0, seq_index, torch.ones_like(weighted)
        )
        per_seq = mask * seq_sum / torch.clamp(mask * seq_len, min=1.0)
        # where, not only the product: a non-finite loss on a masked sequence must not leak a NaN.
        per_seq = torch.where(mask != 0, per_seq, torch.zeros_like(per_seq))
        return per_seq.sum() / total_sequences
    if mode == "token_mean":
        tok_mask = mask[seq_index]
        per_tok = torch.where(tok_mask != 0, tok_mask * weighted, torch.zeros_like(weighted))
        return per_tok.sum() / max(1, total_tokens)
    raise ValueError(f"loss.aggregation must be sequence_mean or token_mean, got {mode!r}")
