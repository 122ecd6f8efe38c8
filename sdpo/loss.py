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
    return divergence_from_logprobs(log_s, log_t, alpha=alpha, topk=topk, add_tail=add_tail)


def divergence_from_logprobs(log_s: Tensor, log_t: Tensor, *, alpha: float, topk: int | None, add_tail: bool) -> Tensor:
    """``divergence_per_token`` after the log-softmax: full-vocabulary log-probs (N, V) in, (N,) out.

    Split out so that the chunked path (sdpo/chunked_loss.py) can reuse one log-softmax for the
    divergence, the sampled-token log-prob and the entropy. ``log_t`` must already be detached.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"loss.alpha must be in [0, 1], got {alpha}")
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


def token_level_distillation(student_logp: Tensor, teacher_logp: Tensor, *, alpha: float) -> Tensor:
    """SPEC section 3 token-level mode: stopgrad(logp_S(y) - logp_T(y)) * logp_S(y), (N,), (N,) -> (N,).

    Inputs are the log-probs of the sampled tokens (``token_logprobs``), the student's with grad.
    Its gradient, (logp_S - logp_T) * grad logp_S, is a one-sample REINFORCE estimate of the
    gradient of KL(P_S || P_T) (the omitted E[grad logp_S] is zero), which is why only alpha = 1 is
    defined. The value is not a divergence: log it, but compare gradients, not values.
    """
    if alpha != 1.0:
        raise ValueError(
            f"the token-level estimator (loss.full_logit_distillation=false) needs loss.alpha=1, got {alpha}"
        )
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student log-probs {tuple(student_logp.shape)} and teacher log-probs "
            f"{tuple(teacher_logp.shape)} must have the same shape"
        )
    s = student_logp.to(_compute_dtype(student_logp))
    t = teacher_logp.detach().to(s.dtype)
    return (s - t).detach() * s


def _truncated_ratio(logp: Tensor, base_logp: Tensor, cap: float) -> Tensor:
    # The clamp keeps exp finite for tokens where the two log-probs disagree wildly.
    dtype = torch.promote_types(_compute_dtype(logp), base_logp.dtype)
    diff = logp.detach().to(dtype) - base_logp.detach().to(dtype)
    return torch.clamp(torch.exp(torch.clamp(diff, -20.0, 20.0)), max=cap)


@torch.no_grad()
def rollout_is_weights(learner_logp: Tensor, rollout_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(exp(clamp(learner - rollout, -20, 20)), cap), detached.

    Corrects for the rollout engine's numerics differing from the learner's (SPEC section 4).
    """
    return _truncated_ratio(learner_logp, rollout_logp, cap)


@torch.no_grad()
def rollout_is_weights_at(learner_logp: Tensor, rollout_logp: Tensor, seq_index: Tensor, *, level: str, cap: float,
                          mask_low: float | None = None, mask_high: float | None = None) -> tuple[Tensor, Tensor]:
    """Rollout IS weights per token (N,) at ``level`` and which tokens the band masked (N,) bool (SPEC §9).

    token: r_t = exp(logp_learner_t - logp_rollout_t). sequence: every token of response i gets
    r_i = exp(sum_t of the log-ratio over the response); geometric: exp(mean_t of it). The log-ratio is
    clamped to [-20, 20] before exp (at sequence level: after the sum). A ratio outside
    [mask_low, mask_high] gives weight 0 (masked IS); the others are truncated at ``cap``.
    """
    dtype = torch.promote_types(_compute_dtype(learner_logp), rollout_logp.dtype)
    log_ratio = learner_logp.detach().to(dtype) - rollout_logp.detach().to(dtype)
    if level != "token":
        sequences = int(seq_index.max().item()) + 1 if seq_index.numel() else 0
        per_seq = log_ratio.new_zeros(sequences).index_add_(0, seq_index, log_ratio)
        if level == "geometric":
            per_seq = per_seq / torch.bincount(seq_index, minlength=sequences).clamp(min=1).to(dtype)
        elif level != "sequence":
            raise ValueError(f"unknown rollout IS level {level!r}: token, sequence or geometric")
        log_ratio = per_seq[seq_index]
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    masked = torch.zeros_like(ratio, dtype=torch.bool)
    if mask_low is not None:
        masked |= ratio < mask_low
    if mask_high is not None:
        masked |= ratio > mask_high
    return torch.where(masked, torch.zeros_like(ratio), torch.clamp(ratio, max=cap)), masked


@torch.no_grad()
def off_policy_is_weights(student_logp: Tensor, old_logp: Tensor, clip: float) -> Tensor:
    """Off-policy ratio r_t = min(exp(clamp(logp_S - logp_old, -20, 20)), clip), detached.

    SPEC section 4, for when several optimizer steps share one generation batch (passes or
    mini-batches: ``old_logp`` is the learner's no-grad log-prob of the sampled token before the
    first of them; on the first step r_t = 1). It is a *weight*, like the rollout IS weight, not a PPO ratio: the reference (lasgroup
    SDPO, ``compute_self_distillation_loss``) and TRL's ``apply_importance_sampling_clipping`` both
    detach it, so no gradient flows through r_t and it only rescales each token's divergence. Multiply
    it into ``token_weight`` for ``aggregate``.
    """
    return _truncated_ratio(student_logp, old_logp, clip)


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


# ---------------------------------------------------------------- top_entropy_quantile masking
#
# The rule is over the whole batch (every micro-batch on every rank), yet the loss is computed one
# micro-batch at a time, so it is split in two: one scalar threshold for the whole batch, then a
# per-token comparison that any micro-batch can apply on its own. Learner recipe:
#   1. no-grad pass over this rank's micro-batches: ent_mb = token_entropy(student_logits) (or
#      chunked_loss.chunked_logp_entropy); keep them (N floats per micro-batch);
#   2. thr = gather_entropy_threshold(torch.cat(all ent_mb of this rank), q)   # collective
#   3. training pass: token_weight *= top_entropy_mask(ent_mb, thr) for each micro-batch.
# Keep the entropies of step 1 rather than recomputing them in step 3, so the mask cannot flip on a
# token whose entropy lies exactly on the threshold.


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy -sum p log p of the distribution at each position, in float32+: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    return -(torch.exp(logp) * logp).sum(-1)


def entropy_threshold(entropies: Tensor, quantile: float) -> float:
    """The entropy at or above which a token is in the top ``quantile`` fraction of ``entropies``.

    ``entropies`` are those of every response token of the batch (1-D, no padding). The threshold
    is the (1 - quantile) quantile with linear interpolation, as ``torch.quantile`` and TRL's
    ``get_high_entropy_mask`` compute it (written out because ``torch.quantile`` refuses inputs
    over 16M elements). quantile = 1 gives -inf (every token); no tokens give +inf (none).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"loss.top_entropy_quantile must be in (0, 1], got {quantile}")
    if quantile == 1.0:
        return float("-inf")
    values = entropies.detach().reshape(-1).double()
    if values.numel() == 0:
        return float("inf")
    ordered = torch.sort(values).values
    position = (1.0 - quantile) * (values.numel() - 1)
    lo = math.floor(position)
    hi = min(lo + 1, values.numel() - 1)
    frac = position - lo
    return float(ordered[lo] + frac * (ordered[hi] - ordered[lo]))


def gather_entropy_threshold(local_entropies: Tensor, quantile: float, group: object = None) -> float:
    """``entropy_threshold`` over the entropies of all ranks: a collective every rank must call.

    Ranks may hold different token counts; each one's entropies are gathered whole (a few MB even
    for large batches), so the threshold is exactly the single-process one. Without an initialized
    process group it is ``entropy_threshold(local_entropies, quantile)``.
    """
    import torch.distributed as dist

    if quantile == 1.0 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return entropy_threshold(local_entropies, quantile)
    local = local_entropies.detach().reshape(-1).float()
    world = dist.get_world_size(group)
    count = torch.tensor([local.numel()], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c.item()) for c in counts)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])
    return entropy_threshold(gathered, quantile)


def top_entropy_mask(entropies: Tensor, threshold: float) -> Tensor:
    """1.0 where a token's entropy is >= the batch threshold, else 0.0: multiply into ``token_weight``."""
    return (entropies.detach() >= threshold).to(_compute_dtype(entropies))


# ---------------------------------------------------------------- GRPO (SPEC section 6)


def group_advantages(rewards: Tensor, group_index: Tensor, *, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages, one per sequence: (B,), (B,) long -> (B,).

    A_i = r_i - mean_g, divided by (std_g + eps) when ``normalize_std`` (GRPO); without it this is
    Dr.GRPO's advantage. std is the unbiased sample std, as in verl's GRPO estimator; a group of one
    sample gets mean 0 and std 1 there too, so its advantage is its reward (std: r_i / (1 + eps)).
    ``group_index`` says which prompt each sample belongs to; groups need not be contiguous, but
    all of a group's samples must be in ``rewards`` (call this on the whole batch, before splitting).
    """
    if rewards.dim() != 1 or rewards.shape != group_index.shape:
        raise ValueError(
            f"group_advantages: rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} "
            "must be 1-D of the same length"
        )
    r = rewards.to(_compute_dtype(rewards))
    _, index = torch.unique(group_index, return_inverse=True)
    n_groups = int(index.max().item()) + 1 if index.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add(0, index, r) / count
    sq = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add(0, index, (r - mean[index]) ** 2)
    std = torch.sqrt(sq / torch.clamp(count - 1, min=1))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    centred = r - mean[index]
    return centred / (std[index] + eps) if normalize_std else centred


def ppo_clip_per_token(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> Tensor:
    """PPO-clip loss per token: max(-A ratio, -A clamp(ratio, 1 - eps_low, 1 + eps_high)), (N,) -> (N,).

    ``logp`` is the current policy's log-prob of the sampled token (with grad), ``old_logp`` the
    one the advantages were collected under (detached here), ``advantages`` the sequence advantage
    repeated over its tokens. eps_high > eps_low is DAPO's clip-higher. ``dual_clip`` c (> 1)
    additionally caps the loss of negative-advantage tokens at -A c (verl's dual-clip); None: off.
    The log-ratio is clamped to [-20, 20] before exp, like every ratio in this file.
    """
    if not (logp.shape == old_logp.shape == advantages.shape):
        raise ValueError(
            f"ppo_clip_per_token: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"loss.clip_eps_low/high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    dtype = _compute_dtype(logp)
    adv = advantages.detach().to(dtype)
    ratio = torch.exp(torch.clamp(logp.to(dtype) - old_logp.detach().to(dtype), -20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss
