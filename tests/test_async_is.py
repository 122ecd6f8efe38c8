"""SPEC section 9 without Ray: the rollout IS weight at token, sequence and geometric level, the
masking band, and the asynchronous settings that config validation refuses."""

import math

import pytest
import torch

from sdpo.config import Config
from sdpo.learner.objective import MicroBatch, Scores, Totals, micro_batch_loss
from sdpo.loss import rollout_is_weights, rollout_is_weights_at

# two responses: 3 tokens and 2 tokens
SEQ = torch.tensor([0, 0, 0, 1, 1])
LEARNER = torch.log(torch.tensor([0.5, 0.4, 0.9, 0.2, 0.6], dtype=torch.float64))
ROLLOUT = torch.log(torch.tensor([0.25, 0.5, 0.9, 0.8, 0.6], dtype=torch.float64))
RATIOS = [2.0, 0.8, 1.0, 0.25, 1.0]


def at(level, cap=10.0, low=None, high=None):
    weights, masked = rollout_is_weights_at(LEARNER, ROLLOUT, SEQ, level=level, cap=cap, mask_low=low, mask_high=high)
    return weights.tolist(), masked.tolist()


def test_token_level_is_the_existing_truncated_weight():
    weights, masked = at("token", cap=1.5)
    assert weights == pytest.approx([1.5, 0.8, 1.0, 0.25, 1.0])
    assert weights == pytest.approx(rollout_is_weights(LEARNER, ROLLOUT, 1.5).tolist())
    assert not any(masked)


def test_sequence_level_is_the_product_over_the_response():
    weights, _ = at("sequence")
    first, second = 2.0 * 0.8 * 1.0, 0.25 * 1.0
    assert weights == pytest.approx([first] * 3 + [second] * 2)
    assert at("sequence", cap=1.5)[0] == pytest.approx([1.5] * 3 + [second] * 2)


def test_geometric_level_is_the_mean_log_ratio():
    weights, _ = at("geometric")
    first, second = (2.0 * 0.8) ** (1 / 3), 0.25 ** 0.5
    assert weights == pytest.approx([first] * 3 + [second] * 2)


def test_the_band_masks_tokens_or_whole_responses():
    weights, masked = at("token", cap=1.5, low=0.5, high=1.8)
    assert masked == [True, False, False, True, False]
    assert weights == pytest.approx([0.0, 0.8, 1.0, 0.0, 1.0])  # masked: 0, not the cap
    weights, masked = at("sequence", low=0.5)
    assert masked == [False] * 3 + [True] * 2
    assert weights == pytest.approx([1.6] * 3 + [0.0] * 2)


def test_a_huge_log_ratio_stays_finite():
    big = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    tiny = torch.full((5,), -30.0, dtype=torch.float64)
    weights, _ = rollout_is_weights_at(big, tiny, SEQ, level="sequence", cap=2.0)
    assert weights.tolist() == [2.0] * 5 and all(math.isfinite(w) for w in weights.tolist())


def test_the_objective_uses_the_level_and_reports_the_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    sampled = torch.tensor([1, 2, 3, 4, 5])
    student_logp = torch.log_softmax(logits, -1).gather(1, sampled[:, None])[:, 0]
    mb = MicroBatch(sampled=sampled, seq_index=SEQ, rollout_logp=student_logp - torch.log(torch.tensor(RATIOS, dtype=torch.float64)),
                    sd_mask=torch.ones(2), advantage=torch.zeros(2))
    teacher = Scores(logits=torch.randn(5, 7, dtype=torch.float64))
    totals = Totals(sequences=2, sd_tokens=5, all_tokens=5)
    base = Config().loss
    _, plain = micro_batch_loss(base, Scores(logits=logits), teacher, mb, None, totals)
    assert base.rollout_is_cap == 2.0 and base.rollout_is_level == "token"  # the defaults: the existing weight
    assert "is_masked" not in plain and plain["is_weight"] == pytest.approx(2.0 + 0.8 + 1.0 + 0.25 + 1.0, rel=1e-6)
    masked_cfg = base.model_copy(update={"rollout_is_mask_low": 0.5, "rollout_is_mask_high": 1.8})
    _, masked = micro_batch_loss(masked_cfg, Scores(logits=logits), teacher, mb, None, totals)
    assert masked["is_masked"] == 2 and masked["is_weight"] == pytest.approx(0.8 + 1.0 + 1.0, rel=1e-6)
    seq_cfg = base.model_copy(update={"rollout_is_level": "sequence"})
    _, seq = micro_batch_loss(seq_cfg, Scores(logits=logits), teacher, mb, None, totals)
    assert seq["is_weight"] == pytest.approx(3 * min(1.6, base.rollout_is_cap) + 2 * 0.25, rel=1e-6)


def test_colocated_async_is_refused_and_the_band_must_be_a_band():
    with pytest.raises(ValueError, match="rollout.placement=disaggregated"):
        Config(device="cuda", learner={"num_gpus_per_rank": 1}, rollout={"num_gpus_per_replica": 0.5, "placement": "colocated",
                                                                         "max_staleness": 1})
    Config(device="cuda", learner={"num_gpus_per_rank": 1}, rollout={"num_gpus_per_replica": 1, "max_staleness": 2})
    Config(device="cuda", learner={"num_gpus_per_rank": 1}, rollout={"num_gpus_per_replica": 0.5, "placement": "colocated"})
    with pytest.raises(ValueError, match="rollout_is_mask_low"):
        Config(loss={"rollout_is_mask_low": 2.0, "rollout_is_mask_high": 1.0})
    with pytest.raises(ValueError, match="max_staleness"):
        Config(rollout={"max_staleness": -1})


def test_the_dry_run_shows_the_schedule():
    from sdpo.placement import describe

    assert "synchronous (rollout.max_staleness 0)" in describe(Config())
    text = describe(Config(rollout={"max_staleness": 2}))
    assert "asynchronous, rollout.max_staleness 2" in text and "newest weight file between batches" in text
