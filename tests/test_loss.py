"""SPEC sections 3-4: per-token divergence, token-level estimator, IS weights, aggregation.

The chunked path, the entropy quantile and GRPO have their own files (tests/test_loss_*.py).
"""

import math

import pytest
import torch

from sdpo.loss import (
    aggregate,
    divergence_per_token,
    off_policy_is_weights,
    rollout_is_weights,
    token_level_distillation,
    token_logprobs,
)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def logits_of(probs):
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float64)


def div(ps, pt, **kw):
    return divergence_per_token(logits_of(ps), logits_of(pt), **kw).item()


PS = [0.5, 0.3, 0.2]
PT = [0.2, 0.5, 0.3]


# ---------------------------------------------------------------- hand-computed values


def test_token_logprobs():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.tensor([2, 1]))
    assert out.dtype == torch.float32
    z = math.exp(1) + math.exp(2) + math.exp(3)
    assert out.tolist() == pytest.approx([3 - math.log(z), -math.log(3)], abs=1e-6)


def test_forward_kl_full_vocab():
    # alpha = 0: KL(P_T || P_S)
    expected = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert div(PS, PT, alpha=0.0, topk=None, add_tail=True) == pytest.approx(expected, abs=1e-12)


def test_reverse_kl_full_vocab():
    # alpha = 1: KL(P_S || P_T)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    assert div(PS, PT, alpha=1.0, topk=None, add_tail=True) == pytest.approx(expected, abs=1e-12)


def test_jsd_half_full_vocab():
    m = [0.35, 0.4, 0.25]
    expected = 0.5 * kl(PS, m) + 0.5 * kl(PT, m)
    assert div(PS, PT, alpha=0.5, topk=None, add_tail=True) == pytest.approx(expected, abs=1e-12)


def test_generalized_jsd_weights():
    a = 0.25
    m = [(1 - a) * s + a * t for s, t in zip(PS, PT)]
    expected = (1 - a) * kl(PS, m) + a * kl(PT, m)
    assert div(PS, PT, alpha=a, topk=None, add_tail=False) == pytest.approx(expected, abs=1e-12)


def test_endpoints_are_separate_branches():
    # The mixture vanishes as alpha -> 0, the forward KL does not: alpha = 0 is its own branch.
    assert div(PS, PT, alpha=1e-9, topk=None, add_tail=True) < 1e-7
    assert div(PS, PT, alpha=0.0, topk=None, add_tail=True) > 0.1


S4 = [0.4, 0.3, 0.2, 0.1]
T4 = [0.1, 0.2, 0.3, 0.4]


def test_topk_with_tail():
    # Student top-2 = ids 0, 1; tail bucket holds the rest on each side.
    s, t = [0.4, 0.3, 0.3], [0.1, 0.2, 0.7]
    assert div(S4, T4, alpha=1.0, topk=2, add_tail=True) == pytest.approx(kl(s, t), abs=1e-9)
    assert div(S4, T4, alpha=0.0, topk=2, add_tail=True) == pytest.approx(kl(t, s), abs=1e-9)
    m = [0.25, 0.25, 0.5]
    assert div(S4, T4, alpha=0.5, topk=2, add_tail=True) == pytest.approx(
        0.5 * kl(s, m) + 0.5 * kl(t, m), abs=1e-9
    )


def test_topk_without_tail_renormalizes():
    s, t = [4 / 7, 3 / 7], [1 / 3, 2 / 3]
    assert div(S4, T4, alpha=1.0, topk=2, add_tail=False) == pytest.approx(kl(s, t), abs=1e-12)


def test_topk_without_tail_forward_kl_and_jsd():
    s, t = [4 / 7, 3 / 7], [1 / 3, 2 / 3]
    assert div(S4, T4, alpha=0.0, topk=2, add_tail=False) == pytest.approx(kl(t, s), abs=1e-12)
    m = [0.75 * a + 0.25 * b for a, b in zip(s, t)]
    assert div(S4, T4, alpha=0.25, topk=2, add_tail=False) == pytest.approx(
        0.75 * kl(s, m) + 0.25 * kl(t, m), abs=1e-12
    )


def test_topk_one_with_tail_is_a_two_bucket_divergence():
    # k = 1: the student's argmax (id 0) against "everything else".
    s, t = [0.4, 0.6], [0.1, 0.9]
    assert div(S4, T4, alpha=1.0, topk=1, add_tail=True) == pytest.approx(kl(s, t), abs=1e-9)


def test_forward_kl_is_reverse_kl_with_roles_swapped():
    # Full vocabulary only: with top-k the support is the student's, so swapping changes it.
    assert div(PS, PT, alpha=0.0, topk=None, add_tail=True) == pytest.approx(
        div(PT, PS, alpha=1.0, topk=None, add_tail=True), abs=1e-12
    )


def test_jsd_alpha_swaps_with_roles():
    # (1-a) KL(S||M) + a KL(T||M) with M = (1-a) S + a T is symmetric under (S, a) <-> (T, 1-a).
    for a in (0.2, 0.5, 0.7):
        assert div(PS, PT, alpha=a, topk=None, add_tail=True) == pytest.approx(
            div(PT, PS, alpha=1 - a, topk=None, add_tail=True), abs=1e-12
        )


def test_jsd_vanishes_towards_both_endpoints():
    # The mixture collapses onto one side at either end; the endpoints' KLs do not.
    for a in (1e-9, 1 - 1e-9):
        assert div(PS, PT, alpha=a, topk=None, add_tail=True) < 1e-7
    assert div(PS, PT, alpha=1.0, topk=None, add_tail=True) > 0.1


def test_topk_support_is_students():
    # The teacher's own top-2 (ids 2, 3) must not be used.
    s, t = [0.4, 0.3, 0.3], [0.1, 0.2, 0.7]
    assert div(S4, T4, alpha=1.0, topk=2, add_tail=True) == pytest.approx(kl(s, t), abs=1e-9)
    assert div(S4, T4, alpha=1.0, topk=2, add_tail=True) != pytest.approx(
        kl([0.2, 0.1, 0.7], [0.3, 0.4, 0.3]), abs=1e-3
    )


@pytest.mark.parametrize("k", [4, 10])
def test_topk_at_least_vocab_is_full_vocab(k):
    for tail in (True, False):
        for a in (0.0, 0.5, 1.0):
            assert div(S4, T4, alpha=a, topk=k, add_tail=tail) == pytest.approx(
                div(S4, T4, alpha=a, topk=None, add_tail=False), abs=1e-12
            )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("topk,tail", [(None, True), (3, True), (3, False), (1, True)])
def test_identity_is_zero(alpha, topk, tail):
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = divergence_per_token(x, x.clone(), alpha=alpha, topk=topk, add_tail=tail)
    assert out.shape == (5,)
    assert out.abs().max().item() < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("topk,tail", [(None, True), (3, True), (3, False)])
def test_identity_gives_zero_gradient(alpha, topk, tail):
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    student = x.clone().requires_grad_(True)
    divergence_per_token(student, x, alpha=alpha, topk=topk, add_tail=tail).sum().backward()
    assert student.grad.abs().max().item() < 1e-12


def test_topk_equal_to_vocab_matches_full_vocab_gradient():
    g = torch.Generator().manual_seed(6)
    s0, t = torch.randn(4, 9, dtype=torch.float64, generator=g), torch.randn(4, 9, dtype=torch.float64, generator=g)
    grads = []
    for topk, tail in ((None, False), (9, True), (9, False)):
        s = s0.clone().requires_grad_(True)
        divergence_per_token(s, t, alpha=0.5, topk=topk, add_tail=tail).sum().backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-14) and torch.allclose(grads[0], grads[2], atol=1e-14)


def test_invalid_alpha():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="alpha"):
        divergence_per_token(x, x, alpha=1.5, topk=None, add_tail=True)


# ---------------------------------------------------------------- independent reference


def reference(student, teacher, alpha, topk, tail):
    """Row by row, in probability space, with plain Python sorting."""
    out = []
    for zs, zt in zip(student.tolist(), teacher.tolist()):
        ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
        pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        if topk is not None and topk < len(zs):
            ids = sorted(range(len(zs)), key=lambda i: -ps[i])[:topk]
            ps, pt = [ps[i] for i in ids], [pt[i] for i in ids]
            if tail:
                ps, pt = ps + [1 - sum(ps)], pt + [1 - sum(pt)]
            else:
                ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
        if alpha == 0:
            out.append(kl(pt, ps))
        elif alpha == 1:
            out.append(kl(ps, pt))
        else:
            m = [(1 - alpha) * s + alpha * t for s, t in zip(ps, pt)]
            out.append((1 - alpha) * kl(ps, m) + alpha * kl(pt, m))
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(
    "topk,tail", [(None, True), (5, True), (5, False), (2, True), (2, False), (20, True)]
)
def test_matches_reference(alpha, topk, tail):
    g = torch.Generator().manual_seed(1)
    student = 2 * torch.randn(6, 16, dtype=torch.float64, generator=g)
    teacher = 2 * torch.randn(6, 16, dtype=torch.float64, generator=g)
    got = divergence_per_token(student, teacher, alpha=alpha, topk=topk, add_tail=tail)
    assert got.tolist() == pytest.approx(reference(student, teacher, alpha, topk, tail), abs=1e-10)


def test_float32_inputs_bf16_agree_with_reference():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    got = divergence_per_token(student.bfloat16(), teacher.bfloat16(), alpha=0.5, topk=8, add_tail=True)
    assert got.dtype == torch.float32
    ref = reference(student.bfloat16().double(), teacher.bfloat16().double(), 0.5, 8, True)
    assert got.tolist() == pytest.approx(ref, abs=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "alpha,topk,tail",
    [(0.5, None, True), (0.3, None, True), (0.0, None, True), (1.0, None, True),
     (1.0, 3, True), (0.5, 3, True), (0.0, 3, True), (1.0, 3, False), (0.5, 3, False)],
)
def test_gradient_matches_finite_differences(alpha, topk, tail):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 7, dtype=torch.float64, generator=g)
    teacher = torch.randn(3, 7, dtype=torch.float64, generator=g)
    weights = torch.rand(3, dtype=torch.float64, generator=g)

    def f(x):
        return (divergence_per_token(x, teacher, alpha=alpha, topk=topk, add_tail=tail) * weights).sum()

    x = student.clone().requires_grad_(True)
    f(x).backward()
    eps = 1e-6
    numeric = torch.zeros_like(student)
    for idx in range(student.numel()):
        plus, minus = student.clone(), student.clone()
        plus.view(-1)[idx] += eps
        minus.view(-1)[idx] -= eps
        numeric.view(-1)[idx] = (f(plus) - f(minus)) / (2 * eps)
    assert torch.allclose(x.grad, numeric, atol=1e-7, rtol=1e-6)
    if topk is not None and tail:
        # Tokens outside the top-k still get gradient, through the normalization.
        assert (x.grad.abs() > 1e-8).all()


def test_no_gradient_to_teacher():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    for alpha in (0.0, 0.5, 1.0):
        divergence_per_token(student, teacher, alpha=alpha, topk=3, add_tail=True).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None


# ---------------------------------------------------------------- rollout IS weights


def test_rollout_is_weights():
    learner = torch.tensor([0.0, math.log(1.5), math.log(3.0), 50.0, -50.0], requires_grad=True)
    rollout = torch.zeros(5)
    w = rollout_is_weights(learner, rollout, cap=2.0)
    assert not w.requires_grad
    assert w.tolist() == pytest.approx([1.0, 1.5, 2.0, 2.0, math.exp(-20)], rel=1e-6)
    # The clamp at +-20 shows with a cap that does not bind.
    w = rollout_is_weights(learner, rollout, cap=1e30)
    assert w[3].item() == pytest.approx(math.exp(20), rel=1e-6)
    assert w[4].item() == pytest.approx(math.exp(-20), rel=1e-6)


# ---------------------------------------------------------------- token-level estimator


def test_token_level_value_and_gradient_by_hand():
    # loss = stopgrad(s - t) * s: value (s - t) s, gradient d/ds = (s - t) (not 2s - t).
    s = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([-2.0, -0.5, -1.0], dtype=torch.float64, requires_grad=True)
    out = token_level_distillation(s, t, alpha=1.0)
    assert out.tolist() == pytest.approx([-1.0, 0.0, 2.0])
    out.sum().backward()
    assert s.grad.tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert t.grad is None  # the teacher is a constant


def test_token_level_gradient_through_logits_matches_finite_differences_of_surrogate():
    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(4, 6, dtype=torch.float64, generator=g), torch.randn(4, 6, dtype=torch.float64, generator=g)
    ids = torch.tensor([0, 3, 5, 2])
    teacher_logp = token_logprobs(zt, ids)
    x = zs.clone().requires_grad_(True)
    token_level_distillation(token_logprobs(x, ids), teacher_logp, alpha=1.0).sum().backward()
    # The gradient equals that of c * logp_S with c = logp_S - logp_T frozen at zs: check by
    # finite differences of that surrogate.
    c = (token_logprobs(zs, ids) - teacher_logp).detach()

    def surrogate(z):
        return (c * token_logprobs(z, ids)).sum()

    eps = 1e-6
    numeric = torch.zeros_like(zs)
    for i in range(zs.numel()):
        plus, minus = zs.clone(), zs.clone()
        plus.view(-1)[i] += eps
        minus.view(-1)[i] -= eps
        numeric.view(-1)[i] = (surrogate(plus) - surrogate(minus)) / (2 * eps)
    assert torch.allclose(x.grad, numeric, atol=1e-8)


def test_token_level_expected_gradient_is_reverse_kl_gradient():
    # Averaged over y ~ P_S (exactly, by summing over the vocabulary), the estimator's gradient is
    # the gradient of KL(P_S || P_T): what makes it a valid alpha = 1 objective.
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(3, 5, dtype=torch.float64, generator=g), torch.randn(3, 5, dtype=torch.float64, generator=g)
    x = zs.clone().requires_grad_(True)
    n, v = zs.shape
    ids = torch.arange(v).repeat(n)  # every token at every position
    rows = torch.arange(n).repeat_interleave(v)
    p_s = torch.softmax(zs, -1).reshape(-1)  # P_S(y), a constant weight
    est = token_level_distillation(token_logprobs(x[rows], ids), token_logprobs(zt[rows], ids), alpha=1.0)
    (p_s * est).sum().backward()
    y = zs.clone().requires_grad_(True)
    divergence_per_token(y, zt, alpha=1.0, topk=None, add_tail=False).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-12)


def test_token_level_needs_alpha_one():
    s = torch.zeros(2)
    with pytest.raises(ValueError, match="alpha=1"):
        token_level_distillation(s, s, alpha=0.5)


# ---------------------------------------------------------------- off-policy IS ratio


def test_off_policy_is_weights_are_detached_clipped_ratios():
    student = torch.tensor([0.0, math.log(1.5), math.log(3.0), -math.log(4.0), 60.0], requires_grad=True)
    old = torch.zeros(5)
    r = off_policy_is_weights(student, old, clip=2.0)
    assert not r.requires_grad
    assert r.tolist() == pytest.approx([1.0, 1.5, 2.0, 0.25, 2.0], rel=1e-6)
    # No lower clip, and the +-20 clamp on the log-ratio.
    r = off_policy_is_weights(torch.tensor([-60.0]), torch.zeros(1), clip=2.0)
    assert r.item() == pytest.approx(math.exp(-20), rel=1e-6)


def test_off_policy_weight_only_rescales_the_gradient():
    # r_t is a weight: d(r * loss)/d student = r * d loss/d student, with no term from r itself.
    g = torch.Generator().manual_seed(9)
    zs, zt = torch.randn(3, 6, dtype=torch.float64, generator=g), torch.randn(3, 6, dtype=torch.float64, generator=g)
    ids = torch.tensor([1, 2, 3])
    old = token_logprobs(zs, ids) - torch.tensor([0.3, -0.2, 1.5], dtype=torch.float64)
    x = zs.clone().requires_grad_(True)
    r = off_policy_is_weights(token_logprobs(x, ids), old, clip=2.0)
    assert r.tolist() == pytest.approx([math.exp(0.3), math.exp(-0.2), 2.0])
    (r * divergence_per_token(x, zt, alpha=0.5, topk=None, add_tail=True)).sum().backward()
    y = zs.clone().requires_grad_(True)
    per_token = divergence_per_token(y, zt, alpha=0.5, topk=None, add_tail=True)
    per_token.backward(r)
    assert torch.allclose(x.grad, y.grad, atol=1e-14)


def test_on_policy_ratio_is_one():
    logp = torch.randn(6)
    assert off_policy_is_weights(logp, logp.clone(), clip=2.0).tolist() == [1.0] * 6


# ---------------------------------------------------------------- aggregation

# Three sequences: seq 0 has 3 tokens (the last weighted 0), seq 1 is masked (sd_mask 0), seq 2 has 1.
LOSS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 4.0], dtype=torch.float64)
WEIGHT = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
SEQ = torch.tensor([0, 0, 0, 1, 1, 2])
SD = torch.tensor([1, 0, 1])


def test_sequence_mean_by_hand():
    # seq 0: (1 + 2) / 3 (T counts the zero-weight token), seq 1: 0, seq 2: 0.5 * 4 / 1; over B = 3
    # sequences: the masked one counts in the denominator.
    out = aggregate(LOSS, WEIGHT, SEQ, SD, mode="sequence_mean", total_sequences=3, total_tokens=4)
    assert out.item() == pytest.approx((1.0 + 0.0 + 2.0) / 3)


def test_token_mean_by_hand():
    # Numerator 1 + 2 + 0.5 * 4 over the 4 tokens of sd_mask=1 sequences.
    out = aggregate(LOSS, WEIGHT, SEQ, SD, mode="token_mean", total_sequences=3, total_tokens=4)
    assert out.item() == pytest.approx(5.0 / 4)


def test_masked_sequence_with_nonfinite_loss_does_not_leak():
    loss = LOSS.clone()
    loss[3] = float("inf")
    for mode in ("sequence_mean", "token_mean"):
        out = aggregate(loss, WEIGHT, SEQ, SD, mode=mode, total_sequences=3, total_tokens=4)
        assert math.isfinite(out.item())


def test_all_masked_gives_zero_with_grad():
    loss = LOSS.clone().requires_grad_(True)
    for mode in ("sequence_mean", "token_mean"):
        out = aggregate(loss, WEIGHT, SEQ, torch.zeros(3), mode=mode, total_sequences=3, total_tokens=0)
        assert out.item() == 0.0
        out.backward()


def test_unknown_mode():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(LOSS, WEIGHT, SEQ, SD, mode="mean", total_sequences=3, total_tokens=4)


def _random_batch(seed, n_seq=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n_seq,), generator=g).tolist()
    sd = (torch.rand(n_seq, generator=g) > 0.3).long()
    seqs = []
    for L in lengths:
        loss = torch.rand(L, dtype=torch.float64, generator=g)
        weight = torch.rand(L, dtype=torch.float64, generator=g) * (torch.rand(L, generator=g) > 0.2)
        seqs.append((loss, weight))
    return seqs, sd


def _pack(seqs, sd, members):
    """Concatenate the sequences ``members`` into one micro-batch with local sequence indices."""
    loss = torch.cat([seqs[i][0] for i in members])
    weight = torch.cat([seqs[i][1] for i in members])
    seq_index = torch.cat([torch.full((len(seqs[i][0]),), k) for k, i in enumerate(members)])
    return loss, weight, seq_index, sd[members]


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean"])
def test_split_invariance(mode):
    seqs, sd = _random_batch(4)
    B = len(seqs)
    total_tokens = sum(len(seqs[i][0]) for i in range(B) if sd[i])
    kw = dict(mode=mode, total_sequences=B, total_tokens=total_tokens)

    whole = aggregate(*_pack(seqs, sd, list(range(B))), **kw).item()
    splits = [
        [[0, 1, 2, 3, 4, 5, 6, 7, 8]],
        [[i] for i in range(B)],  # one sequence per micro-batch
        [[0, 1], [2, 3, 4], [5], [6, 7, 8]],
        # two "ranks" with two micro-batches each, sequences not in batch order
        [[8, 0], [3], [5, 1, 7], [2, 6, 4]],
    ]
    for parts in splits:
        total = sum(aggregate(*_pack(seqs, sd, p), **kw).item() for p in parts)
        assert total == pytest.approx(whole, abs=1e-12)

    # Independent whole-batch value straight from the SPEC formula.
    if mode == "sequence_mean":
        ref = sum(
            float(sd[i]) * float((l * w).sum()) / max(1, int(sd[i]) * len(l)) for i, (l, w) in enumerate(seqs)
        ) / B
    else:
        ref = sum(float((l * w).sum()) for i, (l, w) in enumerate(seqs) if sd[i]) / total_tokens
    assert whole == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean"])
def test_split_invariance_of_gradients(mode):
    # The gradients summed over micro-batches equal the whole batch's: what the learner relies on
    # when it backpropagates each micro-batch's share and lets the optimizer see the sum.
    g = torch.Generator().manual_seed(11)
    lengths = [3, 1, 4, 2, 5, 2]
    sd = torch.tensor([1, 1, 0, 1, 1, 1])
    n = sum(lengths)
    student0 = torch.randn(n, 7, dtype=torch.float64, generator=g)
    teacher = torch.randn(n, 7, dtype=torch.float64, generator=g)
    weight = torch.rand(n, dtype=torch.float64, generator=g)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    B = len(lengths)
    total_tokens = sum(L for L, m in zip(lengths, sd) if m)

    def grad_for(parts):
        x = student0.clone().requires_grad_(True)
        for members in parts:
            rows = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in members])
            seq_index = torch.cat([torch.full((lengths[i],), k) for k, i in enumerate(members)])
            per_token = divergence_per_token(x[rows], teacher[rows], alpha=0.5, topk=3, add_tail=True)
            aggregate(per_token, weight[rows], seq_index, sd[members], mode=mode,
                      total_sequences=B, total_tokens=total_tokens).backward()
        return x.grad

    whole = grad_for([list(range(B))])
    assert whole.abs().max() > 0
    for parts in ([[i] for i in range(B)], [[4, 0], [2, 5], [1, 3]]):
        assert torch.allclose(grad_for(parts), whole, atol=1e-14)
