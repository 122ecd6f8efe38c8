"""One micro-batch's share of the training loss, for every objective (SDPO, GRPO, hybrid, routed).

Tensors and a LossConfig in, a scalar out. The teacher's scores arrive precomputed (the worker
decides whose weights produce them, and divides them by the sampling temperature with
``Scores.tempered``); nothing here knows about models or environments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sdpo.chunked_loss import chunked_divergence, chunked_logp_entropy, chunked_token_logprobs
from sdpo.config import LossConfig
from sdpo.loss import (
    aggregate,
    divergence_per_token,
    off_policy_is_weights,
    ppo_clip_per_token,
    rollout_is_weights,
    rollout_is_weights_at,
    token_entropy,
    token_level_distillation,
    token_logprobs,
)


@dataclass
class Totals:
    """Batch-wide normalizers, so every micro-batch and rank adds its exact share of the loss.

    "Batch" is what one optimizer step learns from: the generation batch, or one of its
    mini-batches (optimizer.mini_batches_per_batch)."""

    sequences: int  # all sequences of the batch
    sd_tokens: int  # response tokens of sequences with a teacher signal (sd_mask = 1)
    all_tokens: int  # all response tokens
    routed_tokens: int = 0  # objective=routed: tokens of successes plus of failures with a teacher signal

    @classmethod
    def of(cls, samples: list) -> "Totals":
        """The normalizers of a list of ``TrainSample``s (sd_mask, success, loss_tokens: the model's
        response tokens; an episode's observation tokens are not counted, SPEC 2a)."""
        return cls(sequences=len(samples),
                   sd_tokens=sum(s.loss_tokens for s in samples if s.sd_mask),
                   all_tokens=sum(s.loss_tokens for s in samples),
                   routed_tokens=sum(s.loss_tokens for s in samples if s.success or s.sd_mask))


@dataclass
class Scores:
    """A model's predictions at the response positions: full logits (N, V), or, for the memory-lean
    path, the final hidden states (N, H) and the LM-head weight (V, H), turned into logits
    ``chunk_tokens`` rows at a time and never all at once."""

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    chunk_tokens: int = 0

    def token_logprobs(self, ids: Tensor) -> Tensor:
        if self.logits is not None:
            return token_logprobs(self.logits, ids)
        return chunked_token_logprobs(self.hidden, self.weight, ids, chunk_tokens=self.chunk_tokens)

    def divergence(self, teacher: "Scores", cfg: LossConfig) -> Tensor:
        if self.logits is not None:
            return divergence_per_token(self.logits, teacher.logits, alpha=cfg.alpha, topk=cfg.topk, add_tail=cfg.add_tail)
        return chunked_divergence(self.hidden, teacher.hidden, self.weight, teacher.weight, alpha=cfg.alpha, topk=cfg.topk,
                                  add_tail=cfg.add_tail, chunk_tokens=self.chunk_tokens).per_token

    def tempered(self, temperature: float) -> "Scores":
        """The scores of the distribution the engine sampled from: logits / temperature (SPEC §4).
        For hidden states, h / T gives (h / T) W^T = logits / T, and gradients follow through it."""
        if temperature <= 0:
            raise ValueError(f"the sampling temperature must be > 0 to train on, got {temperature}")
        if temperature == 1.0:
            return self
        if self.logits is not None:
            return Scores(logits=self.logits / temperature)
        return Scores(hidden=self.hidden / temperature, weight=self.weight, chunk_tokens=self.chunk_tokens)

    @torch.no_grad()
    def entropy(self) -> Tensor:
        if self.logits is not None:
            return token_entropy(self.logits)
        return chunked_logp_entropy(self.hidden, self.weight, None, chunk_tokens=self.chunk_tokens)[1]


@dataclass
class MicroBatch:
    sampled: Tensor  # (N,) the response token ids, sequences concatenated
    seq_index: Tensor  # (N,) which sequence of the micro-batch each token belongs to
    rollout_logp: Tensor  # (N,) the engine's log-prob of each sampled token
    sd_mask: Tensor  # (S,) 1 where the sample has a teacher signal
    advantage: Tensor  # (S,) group-relative reward, for policy-gradient objectives
    success: Tensor | None = None  # (S,) 1 where the sample succeeded; needed by objective=routed


def micro_batch_loss(
    cfg: LossConfig,
    student: Scores,
    teacher: Scores | None,
    mb: MicroBatch,
    old_logp: Tensor | None,
    totals: Totals,
    token_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Returns (loss share, sums for metrics). ``old_logp`` is the learner's detached log-prob of
    each sampled token before this batch's first update; None means this is that first update, so
    the current forward's own detached log-probs are the old ones (on-policy: ratio exactly 1).
    ``token_mask`` (N,) zeroes distillation on tokens outside the top entropy quantile."""
    student_logp = student.token_logprobs(mb.sampled)
    old = student_logp.detach() if old_logp is None else old_logp
    # Truncated IS against the engine's numerics, from the learner's pre-update log-probs (SPEC §4).
    masked = None
    if not cfg.rollout_is:
        tis = torch.ones_like(old)
    elif cfg.rollout_is_level == "token" and cfg.rollout_is_mask_low is None and cfg.rollout_is_mask_high is None:
        tis = rollout_is_weights(old, mb.rollout_logp, cfg.rollout_is_cap)
    else:  # sequence-level or masked IS, for stale samples (SPEC §9)
        tis, masked = rollout_is_weights_at(old, mb.rollout_logp, mb.seq_index, level=cfg.rollout_is_level,
                                            cap=cfg.rollout_is_cap, mask_low=cfg.rollout_is_mask_low,
                                            mask_high=cfg.rollout_is_mask_high)
    loss = student_logp.new_zeros((), dtype=torch.float32)
    stats = {"logp_gap_abs": (old - mb.rollout_logp).abs().sum().item(), "is_weight": tis.sum().item()}
    if masked is not None:
        stats["is_masked"] = masked.sum().item()

    routed = cfg.objective == "routed"
    if routed and mb.success is None:
        raise ValueError("loss.objective=routed needs each sample's success flag (MicroBatch.success)")
    if cfg.objective in ("sdpo", "hybrid", "routed"):
        if cfg.full_logit_distillation:
            per_token = student.divergence(teacher, cfg)
        else:
            with torch.no_grad():
                teacher_logp = teacher.token_logprobs(mb.sampled)
            per_token = token_level_distillation(student_logp, teacher_logp, alpha=cfg.alpha)
        weight = tis
        if old_logp is not None and cfg.is_clip is not None:
            # Several updates share one generation batch: reweight toward the current policy.
            weight = weight * off_policy_is_weights(student_logp, old, cfg.is_clip)
        if token_mask is not None:
            weight = weight * token_mask
        # routed: only the failures distil; both terms share one token normalizer, so that with
        # token_mean the two are one mean over every token that gets a gradient.
        sd_mask = mb.sd_mask * (1 - mb.success.to(mb.sd_mask.dtype)) if routed else mb.sd_mask
        sd = aggregate(per_token, weight, mb.seq_index, sd_mask, mode=cfg.aggregation,
                       total_sequences=totals.sequences, total_tokens=totals.routed_tokens if routed else totals.sd_tokens)
        loss = loss + sd
        stats["sd_loss"] = sd.item()

    if cfg.objective in ("grpo", "hybrid", "routed"):
        advantage = mb.advantage.to(student_logp.dtype)[mb.seq_index]
        per_token = ppo_clip_per_token(student_logp, old, advantage, eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high)
        pg_mask = mb.success.to(mb.sd_mask.dtype) if routed else torch.ones_like(mb.sd_mask)
        pg = aggregate(per_token, tis, mb.seq_index, pg_mask, mode=cfg.aggregation,
                       total_sequences=totals.sequences, total_tokens=totals.routed_tokens if routed else totals.all_tokens)
        loss = loss + (cfg.pg_weight if cfg.objective == "hybrid" else 1.0) * pg
        stats["pg_loss"] = pg.item()
        log_ratio = (student_logp - old).detach()
        stats["clip_frac"] = ((log_ratio < math.log1p(-cfg.clip_eps_low)) | (log_ratio > math.log1p(cfg.clip_eps_high))).sum().item()
    return loss, stats

