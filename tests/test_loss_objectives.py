"""The objective of a micro-batch (sdpo/learner/objective.py): sampling temperature, the routed
objective, mini-batch normalizers. Hand-computed values and split invariance, no model."""

import math

import pytest
import torch

from sdpo.batch import TrainSample
from sdpo.config import Config, LossConfig
from sdpo.learner.objective import MicroBatch, Scores, Totals, micro_batch_loss
from sdpo.loss import divergence_per_token, token_logprobs
from sdpo.rollout.hf_engine import sampling_logprobs

# ---------------------------------------------------------------- sampling temperature


def test_tempered_scores_are_logits_over_temperature_on_both_paths():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g)
    ids = torch.randint(0, 11, (7,), generator=g)
    full = Scores(logits=hidden @ weight.T).tempered(0.7)
    assert torch.allclose(full.logits, (hidden @ weight.T) / 0.7)
    chunked = Scores(hidden=hidden, weight=weight, chunk_tokens=3).tempered(0.7)
    assert torch.allclose(chunked.token_logprobs(ids), full.token_logprobs(ids), atol=1e-12)
    assert torch.allclose(chunked.entropy(), full.entropy(), atol=1e-12)
    teacher = Scores(logits=hidden.flip(0) @ weight.T).tempered(0.7)
    teacher_chunked = Scores(hidden=hidden.flip(0), weight=weight, chunk_tokens=3).tempered(0.7)
    cfg = LossConfig(alpha=0.5, topk=4)
    # Gradients of the chunked path reach the hidden states through the division.
    h = hidden.clone().requires_grad_(True)
    Scores(hidden=h, weight=weight, chunk_tokens=3).tempered(0.7).divergence(teacher_chunked, cfg).sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    Scores(logits=h_ref @ weight.T).tempered(0.7).divergence(teacher, cfg).sum().backward()
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-10)
    one = Scores(logits=hidden)
    assert one.tempered(1.0) is one
    with pytest.raises(ValueError, match="temperature must be > 0"):
        one.tempered(0.0)


def _mb(sampled, seq_index, rollout_logp, sd_mask, advantage, success=None):
    def f(x):
        return torch.tensor(x, dtype=torch.float64)

    return MicroBatch(sampled=torch.tensor(sampled), seq_index=torch.tensor(seq_index), rollout_logp=f(rollout_logp),
                      sd_mask=f(sd_mask), advantage=f(advantage), success=None if success is None else f(success))


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_identical_weights_give_rollout_is_weight_one_at_any_temperature(temperature):
    # The engine's log-probs are those of logits / T (sdpo/rollout/hf_engine.py, and vLLM's
    # processed_logprobs); a learner with the same weights must read IS weight 1 on every token.
    g = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(40, 50, dtype=torch.float64, generator=g)  # peaked: tempering matters
    sampled = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g).squeeze(-1)
    engine_logp = sampling_logprobs(logits, temperature, 1.0).gather(-1, sampled[:, None]).squeeze(-1).double()
    mb = _mb(sampled.tolist(), [i // 10 for i in range(40)], engine_logp.tolist(), [1, 1, 1, 1], [0.0] * 4)
    totals = Totals(sequences=4, sd_tokens=40, all_tokens=40)
    cfg = LossConfig()
    _, stats = micro_batch_loss(cfg, Scores(logits=logits).tempered(temperature), Scores(logits=logits).tempered(temperature),
                                mb, None, totals)
    assert stats["is_weight"] / 40 == pytest.approx(1.0, abs=1e-6)
    assert stats["logp_gap_abs"] / 40 < 1e-6
    # Without the division (the bug this guards against) the weights are off and some hit the cap.
    _, wrong = micro_batch_loss(cfg, Scores(logits=logits), Scores(logits=logits), mb, None, totals)
    assert abs(wrong["is_weight"] / 40 - 1.0) > 0.05


# ---------------------------------------------------------------- routed objective

# Three sequences of one group: 0 succeeded (2 tokens), 1 failed with a teacher signal (3 tokens),
# 2 failed without one (1 token).
G = torch.Generator().manual_seed(2)
STUDENT = torch.randn(6, 9, dtype=torch.float64, generator=G)
TEACHER = torch.randn(6, 9, dtype=torch.float64, generator=G)
SAMPLED = [1, 4, 2, 7, 0, 3]
SEQ = [0, 0, 1, 1, 1, 2]
ADV = [1.5, -0.5, -1.0]
SUCCESS = [1, 0, 0]
SD_MASK = [1, 1, 0]  # the success has a signal too (a second success): routed ignores it


def _routed_inputs():
    rollout = token_logprobs(STUDENT, torch.tensor(SAMPLED)).tolist()  # engine == learner: IS weight 1
    mb = _mb(SAMPLED, SEQ, rollout, SD_MASK, ADV, SUCCESS)
    totals = Totals(sequences=3, sd_tokens=5, all_tokens=6, routed_tokens=5)
    return mb, totals


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_routed_by_hand(aggregation):
    mb, totals = _routed_inputs()
    cfg = LossConfig(objective="routed", topk=None, alpha=0.5, aggregation=aggregation)
    loss, stats = micro_batch_loss(cfg, Scores(logits=STUDENT), Scores(logits=TEACHER), mb, None, totals)
    d = divergence_per_token(STUDENT, TEACHER, alpha=0.5, topk=None, add_tail=True).tolist()
    # On-policy PPO-clip is -A per token; only the success (seq 0) takes it, only seq 1 distils.
    if aggregation == "sequence_mean":
        expected_pg, expected_sd = (-1.5) / 3, (d[2] + d[3] + d[4]) / 3 / 3
    else:  # one mean over the 5 tokens that get a gradient (seq 0's 2 and seq 1's 3)
        expected_pg, expected_sd = 2 * (-1.5) / 5, (d[2] + d[3] + d[4]) / 5
    assert stats["pg_loss"] == pytest.approx(expected_pg, abs=1e-12)
    assert stats["sd_loss"] == pytest.approx(expected_sd, abs=1e-12)
    assert loss.item() == pytest.approx(expected_pg + expected_sd, abs=1e-12)


def test_routed_needs_success_flags():
    mb, totals = _routed_inputs()
    mb.success = None
    with pytest.raises(ValueError, match="success flag"):
        micro_batch_loss(LossConfig(objective="routed"), Scores(logits=STUDENT), Scores(logits=TEACHER), mb, None, totals)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_routed_split_invariance_of_value_and_gradient(aggregation):
    g = torch.Generator().manual_seed(3)
    lengths = [3, 1, 4, 2, 5, 2, 3]
    n_seq, n = len(lengths), sum(lengths)
    student0 = torch.randn(n, 8, dtype=torch.float64, generator=g)
    teacher = torch.randn(n, 8, dtype=torch.float64, generator=g)
    sampled = torch.randint(0, 8, (n,), generator=g)
    rollout = token_logprobs(student0, sampled) + 0.1 * torch.randn(n, dtype=torch.float64, generator=g)
    success = [1, 0, 0, 1, 0, 1, 0]
    sd_mask = [0, 1, 0, 1, 1, 1, 1]
    adv = torch.randn(n_seq, dtype=torch.float64, generator=g).tolist()
    starts = [sum(lengths[:i]) for i in range(n_seq)]
    totals = Totals(sequences=n_seq, sd_tokens=sum(L for L, m in zip(lengths, sd_mask) if m), all_tokens=n,
                    routed_tokens=sum(L for L, s, m in zip(lengths, success, sd_mask) if s or m))
    cfg = LossConfig(objective="routed", topk=3, aggregation=aggregation)

    def run(parts):
        x = student0.clone().requires_grad_(True)
        total = 0.0
        for members in parts:
            rows = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in members])
            seq_index = torch.cat([torch.full((lengths[i],), k) for k, i in enumerate(members)])
            mb = _mb(sampled[rows].tolist(), seq_index.tolist(), rollout[rows].tolist(), [sd_mask[i] for i in members],
                     [adv[i] for i in members], [success[i] for i in members])
            loss, _ = micro_batch_loss(cfg, Scores(logits=x[rows]), Scores(logits=teacher[rows]), mb, None, totals)
            loss.backward()
            total += loss.item()
        return total, x.grad

    whole, grad = run([list(range(n_seq))])
    assert grad.abs().max() > 0
    for parts in ([[i] for i in range(n_seq)], [[6, 0], [2, 5, 1], [3, 4]]):
        value, g_parts = run(parts)
        assert value == pytest.approx(whole, abs=1e-12)
        assert torch.allclose(g_parts, grad, atol=1e-14)


def test_totals_of_samples_by_hand():
    def sample(n, sd, ok):
        return TrainSample([1], [2] * n, [0.0] * n, [1], sd_mask=sd, success=ok)

    totals = Totals.of([sample(3, 1, 0), sample(2, 0, 1), sample(4, 0, 0), sample(1, 1, 1)])
    assert (totals.sequences, totals.sd_tokens, totals.all_tokens, totals.routed_tokens) == (4, 4, 10, 6)


# ---------------------------------------------------------------- off-policy weight in a later mini-batch


def test_later_mini_batch_weighs_against_the_first_pass_logprobs():
    # A mini-batch trained after the policy moved: the rollout IS weight comes from the first-pass
    # (pre-update) log-probs, the off-policy weight min(exp(now - first pass), is_clip) rescales
    # each token's divergence.
    mb, totals = _routed_inputs()
    mb.sd_mask = torch.ones(3, dtype=torch.float64)
    now = token_logprobs(STUDENT, mb.sampled)
    first_pass = now - torch.tensor([0.3, -0.2, 1.5, 0.0, 0.1, -3.0], dtype=torch.float64)
    mb.rollout_logp = first_pass.clone()  # engine == first pass: rollout IS weight 1
    cfg = LossConfig(topk=None, alpha=1.0, is_clip=2.0)
    loss, stats = micro_batch_loss(cfg, Scores(logits=STUDENT), Scores(logits=TEACHER), mb, first_pass, totals)
    d = divergence_per_token(STUDENT, TEACHER, alpha=1.0, topk=None, add_tail=True).tolist()
    r = [math.exp(0.3), math.exp(-0.2), 2.0, 1.0, math.exp(0.1), math.exp(-3.0)]
    expected = ((r[0] * d[0] + r[1] * d[1]) / 2 + (r[2] * d[2] + r[3] * d[3] + r[4] * d[4]) / 3 + r[5] * d[5]) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["is_weight"] == pytest.approx(6.0)


# ---------------------------------------------------------------- the settings


def test_new_defaults_and_refusals():
    cfg = Config()
    assert (cfg.teacher.update_every, cfg.optimizer.mini_batches_per_batch, cfg.teacher.guard) == ("batch", 1, "off")
    with pytest.raises(ValueError, match="the learner does not apply the nucleus"):
        Config(rollout={"top_p": 0.95})
    assert Config(rollout={"top_p": 0.95}, steps=0).rollout.top_p == 0.95  # evaluation only: allowed
    with pytest.raises(ValueError, match="rollout.temperature must be > 0 for training"):
        Config(rollout={"temperature": 0.0})
    with pytest.raises(ValueError, match="must divide prompts_per_step=32"):
        Config(optimizer={"mini_batches_per_batch": 3})
    with pytest.raises(ValueError, match="must be divisible by learner.world_size = 2"):
        Config(prompts_per_step=4, rollout={"samples_per_prompt": 3}, optimizer={"mini_batches_per_batch": 4})
    assert Config(optimizer={"mini_batches_per_batch": 32}).optimizer.mini_batches_per_batch == 32
