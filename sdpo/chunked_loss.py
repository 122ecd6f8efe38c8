"""The SDPO divergence from hidden states, a chunk of response tokens at a time.

The straightforward loss materializes (N, V) logits for student and teacher, their float32 copies,
both log-softmaxes and the divergence's intermediates: at N = 8,192 response tokens and Qwen3's
V = 151,936 each float32 (N, V) tensor is 5 GB, and autograd keeps several of them until backward.
Here the LM head is applied to ``chunk_tokens`` rows at a time inside a custom autograd Function:
forward keeps only per-token results, and backward recomputes each chunk's logits and divergence
and pushes its gradient straight into preallocated ``grad_hidden`` (N, H) and float32 ``grad_weight``
(V, H). The peak then scales with ``chunk_tokens * V``, not ``N * V``.

Values are exactly those of ``divergence_per_token`` on the full logits (the same per-row code runs
on each chunk); gradients agree to float rounding (the weight gradient is summed over chunks in
float32). Cost: the student and teacher LM-head matmuls run twice (forward and backward), about
1.5x the straightforward path's matmul work for the loss head.

Inputs are plain tensors: with FSDP2 the caller passes the unsharded LM-head weight (e.g. inside the
root module's forward, or ``DTensor.full_tensor()``). LM heads with a bias or logit soft-capping
are not covered. A sampling temperature T is applied by the caller, dividing the hidden states by T
(``objective.Scores.tempered``): (h / T) W^T = logits / T, and the gradients follow through it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.loss import divergence_from_logprobs, divergence_per_token


class ChunkedDivergence(NamedTuple):
    per_token: Tensor  # (N,) divergence, differentiable w.r.t. student hidden states and LM head
    student_logp: Tensor | None  # (N,) detached log-prob of ``sampled_ids`` (None without them)
    student_entropy: Tensor  # (N,) detached entropy of the student distribution


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _check_chunk(chunk_tokens: int) -> None:
    if chunk_tokens < 1:
        raise ValueError(f"loss.chunk_tokens must be >= 1, got {chunk_tokens}")


def _check_head(name: str, hidden: Tensor, weight: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden states must be (N, H) and the LM-head weight (V, H); got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )


def _head_backward(grad_logits: Tensor, hidden: Tensor, weight: Tensor, rows: slice,
                   grad_hidden: Tensor | None, grad_weight: Tensor | None) -> None:
    """Push one chunk's logit gradient through ``logits = hidden @ weight.T`` into the preallocated
    gradients (``grad_weight`` is the float32 accumulator over chunks)."""
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), hidden[rows].to(grad_weight.dtype))


class _ChunkedDivergenceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, t_hidden, s_weight, t_weight, sampled_ids, alpha, topk, add_tail, chunk_tokens):
        n = s_hidden.shape[0]
        dtype = _compute_dtype(s_hidden)
        per_token = torch.empty(n, dtype=dtype, device=s_hidden.device)
        entropy = torch.empty(n, dtype=dtype, device=s_hidden.device)
        logp = torch.empty(n if sampled_ids is not None else 0, dtype=dtype, device=s_hidden.device)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            log_s = torch.log_softmax(F.linear(s_hidden[rows], s_weight).to(dtype), dim=-1)
            log_t = torch.log_softmax(F.linear(t_hidden[rows], t_weight).to(dtype), dim=-1)
            per_token[rows] = divergence_from_logprobs(log_s, log_t, alpha=alpha, topk=topk, add_tail=add_tail)
            del log_t
            if sampled_ids is not None:
                logp[rows] = log_s.gather(-1, sampled_ids[rows].long().unsqueeze(-1)).squeeze(-1)
            entropy[rows] = -(torch.exp(log_s) * log_s).sum(-1)
        ctx.save_for_backward(s_hidden, t_hidden, s_weight, t_weight)
        ctx.options = (alpha, topk, add_tail, chunk_tokens)
        ctx.mark_non_differentiable(logp, entropy)
        return per_token, logp, entropy

    @staticmethod
    def backward(ctx, grad_per_token, _grad_logp, _grad_entropy):
        s_hidden, t_hidden, s_weight, t_weight = ctx.saved_tensors
        alpha, topk, add_tail, chunk_tokens = ctx.options
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(s_hidden) if need_hidden else None
        # float32 accumulation over chunks: one rounding to the weight's dtype at the end, as a
        # single full-sequence matmul would do.
        grad_weight = torch.zeros(s_weight.shape, dtype=_compute_dtype(s_weight), device=s_weight.device) if need_weight else None
        for start in range(0, s_hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(s_hidden[rows], s_weight).detach().requires_grad_(True)
            teacher_logits = F.linear(t_hidden[rows], t_weight)
            with torch.enable_grad():
                loss = divergence_per_token(logits, teacher_logits, alpha=alpha, topk=topk, add_tail=add_tail)
                (grad_logits,) = torch.autograd.grad(loss, logits, grad_per_token[rows])
            del teacher_logits, loss, logits
            _head_backward(grad_logits, s_hidden, s_weight, rows, grad_hidden, grad_weight)
        if need_weight:
            grad_weight = grad_weight.to(s_weight.dtype)
        # The teacher is a constant: no gradient to its hidden states or weight.
        return grad_hidden, None, grad_weight, None, None, None, None, None, None


def chunked_divergence(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    *,
    alpha: float,
    topk: int | None,
    add_tail: bool,
    chunk_tokens: int,
    sampled_ids: Tensor | None = None,
) -> ChunkedDivergence:
    """``divergence_per_token(student_hidden @ W_S.T, teacher_hidden @ W_T.T, ...)`` without the (N, V) logits.

    ``student_hidden`` (N, H) is the last hidden state (after the final norm) at the N response
    positions, with grad; ``teacher_hidden`` (N, H) the teacher's at the same response indices (used
    as a constant). ``*_lm_head_weight`` (V, H). Gradients reach ``student_hidden`` and
    ``student_lm_head_weight``. With ``sampled_ids`` (N,) it also returns the student's detached
    log-prob of each sampled token (for the rollout and off-policy IS weights), and always the
    student's detached entropy (for ``top_entropy_quantile`` and metrics), both from the same
    log-softmax as the divergence, so they cost no extra matmul.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"loss.alpha must be in [0, 1], got {alpha}")
    _check_chunk(chunk_tokens)
    _check_head("student", student_hidden, student_lm_head_weight)
    _check_head("teacher", teacher_hidden, teacher_lm_head_weight)
    if student_hidden.shape[0] != teacher_hidden.shape[0] or student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(
            f"student and teacher must cover the same tokens and vocabulary: hidden {tuple(student_hidden.shape)} vs "
            f"{tuple(teacher_hidden.shape)}, LM head {tuple(student_lm_head_weight.shape)} vs {tuple(teacher_lm_head_weight.shape)}"
        )
    if sampled_ids is not None and sampled_ids.shape != (student_hidden.shape[0],):
        raise ValueError(f"sampled_ids must be ({student_hidden.shape[0]},), got {tuple(sampled_ids.shape)}")
    per_token, logp, entropy = _ChunkedDivergenceFn.apply(
        student_hidden,
        teacher_hidden.detach(),
        student_lm_head_weight,
        teacher_lm_head_weight.detach(),
        sampled_ids,
        alpha,
        topk,
        add_tail,
        chunk_tokens,
    )
    return ChunkedDivergence(per_token, logp if sampled_ids is not None else None, entropy)


class _ChunkedTokenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk_tokens):
        dtype = _compute_dtype(hidden)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logp = torch.log_softmax(F.linear(hidden[rows], weight).to(dtype), dim=-1)
            out[rows] = logp.gather(-1, ids[rows].long().unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, ids = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=_compute_dtype(weight), device=weight.device) if need_weight else None
        dtype = _compute_dtype(hidden)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            g = grad_out[rows].to(dtype)
            # d logp(y) / d logits = onehot(y) - softmax(logits)
            grad_logits = -g.unsqueeze(-1) * torch.softmax(F.linear(hidden[rows], weight).to(dtype), dim=-1)
            grad_logits.scatter_add_(-1, ids[rows].long().unsqueeze(-1), g.unsqueeze(-1))
            _head_backward(grad_logits.to(hidden.dtype), hidden, weight, rows, grad_hidden, grad_weight)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_token_logprobs(hidden: Tensor, lm_head_weight: Tensor, ids: Tensor, *, chunk_tokens: int) -> Tensor:
    """``token_logprobs(hidden @ W.T, ids)`` without the (N, V) logits, differentiable: (N, H), (V, H), (N,) -> (N,).

    For the token-level estimator and the GRPO ratio at large vocabularies (student with grad; the
    teacher's under ``torch.no_grad()``).
    """
    _check_chunk(chunk_tokens)
    _check_head("chunked_token_logprobs", hidden, lm_head_weight)
    if ids.shape != (hidden.shape[0],):
        raise ValueError(f"ids must be ({hidden.shape[0]},), got {tuple(ids.shape)}")
    return _ChunkedTokenLogprobsFn.apply(hidden, lm_head_weight, ids, chunk_tokens)


@torch.no_grad()
def chunked_logp_entropy(hidden: Tensor, lm_head_weight: Tensor, ids: Tensor | None, *, chunk_tokens: int) -> tuple[Tensor | None, Tensor]:
    """No-grad log-prob of ``ids`` (None without ids) and entropy per position, a chunk at a time.

    For the learner's no-grad pre-pass: "old" log-probs when several optimizer steps share a batch,
    and the entropies that ``top_entropy_quantile`` needs before the first backward.
    """
    _check_chunk(chunk_tokens)
    _check_head("chunked_logp_entropy", hidden, lm_head_weight)
    dtype = _compute_dtype(hidden)
    n = hidden.shape[0]
    entropy = torch.empty(n, dtype=dtype, device=hidden.device)
    logp = torch.empty(n, dtype=dtype, device=hidden.device) if ids is not None else None
    for start in range(0, n, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        log_p = torch.log_softmax(F.linear(hidden[rows], lm_head_weight).to(dtype), dim=-1)
        entropy[rows] = -(torch.exp(log_p) * log_p).sum(-1)
        if logp is not None:
            logp[rows] = log_p.gather(-1, ids[rows].long().unsqueeze(-1)).squeeze(-1)
    return logp, entropy
