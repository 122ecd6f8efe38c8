"""The chunked (memory-lean) loss equals the straightforward one: values and gradients."""

import pytest
import torch

from sdpo.chunked_loss import chunked_divergence, chunked_logp_entropy, chunked_token_logprobs
from sdpo.loss import divergence_per_token, token_entropy, token_logprobs

N, H, V = 23, 12, 40


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g).to(dtype)
    ht = torch.randn(N, H, generator=g).to(dtype)
    ws = (torch.randn(V, H, generator=g) / 2).to(dtype)
    wt = (torch.randn(V, H, generator=g) / 2).to(dtype)
    upstream = torch.rand(N, generator=g, dtype=torch.float64)  # per-token weights of a later aggregate
    ids = torch.randint(0, V, (N,), generator=g)
    return hs, ht, ws, wt, upstream, ids


def _straightforward(hs, ht, ws, wt, upstream, **kw):
    hs, ws = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    per_token = divergence_per_token(hs @ ws.t(), ht @ wt.t(), **kw)
    (per_token * upstream.to(per_token.dtype)).sum().backward()
    return per_token.detach(), hs.grad, ws.grad


def _chunked(hs, ht, ws, wt, upstream, chunk_tokens, ids=None, **kw):
    hs, ws = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    out = chunked_divergence(hs, ht, ws, wt, chunk_tokens=chunk_tokens, sampled_ids=ids, **kw)
    (out.per_token * upstream.to(out.per_token.dtype)).sum().backward()
    return out, hs.grad, ws.grad


MODES = [
    dict(alpha=0.0, topk=None, add_tail=True),
    dict(alpha=1.0, topk=None, add_tail=True),
    dict(alpha=0.5, topk=None, add_tail=True),
    dict(alpha=0.3, topk=5, add_tail=True),
    dict(alpha=1.0, topk=5, add_tail=False),
    dict(alpha=0.0, topk=1, add_tail=True),
]


@pytest.mark.parametrize(
    "kw,chunk_tokens",
    [(kw, 4) for kw in MODES] + [(MODES[3], 1), (MODES[3], 23), (MODES[3], 100)],  # ragged, exact, one chunk
)
def test_float64_identical_to_straightforward(kw, chunk_tokens):
    hs, ht, ws, wt, up, ids = _inputs(torch.float64)
    ref, ref_gh, ref_gw = _straightforward(hs, ht, ws, wt, up, **kw)
    out, gh, gw = _chunked(hs, ht, ws, wt, up, chunk_tokens, ids=ids, **kw)
    assert torch.allclose(out.per_token, ref, atol=1e-13, rtol=0)
    assert torch.allclose(gh, ref_gh, atol=1e-13, rtol=0)
    assert torch.allclose(gw, ref_gw, atol=1e-13, rtol=0)
    assert torch.allclose(out.student_logp, token_logprobs(hs @ ws.t(), ids), atol=1e-13)
    assert torch.allclose(out.student_entropy, token_entropy(hs @ ws.t()), atol=1e-13)
    assert not out.student_logp.requires_grad and not out.student_entropy.requires_grad


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_matches_straightforward(dtype, atol):
    # Same dtype flow as the straightforward path (logits in the model's dtype, math in float32).
    hs, ht, ws, wt, up, _ = _inputs(dtype, seed=1)
    kw = dict(alpha=0.5, topk=5, add_tail=True)
    ref, ref_gh, ref_gw = _straightforward(hs, ht, ws, wt, up, **kw)
    out, gh, gw = _chunked(hs, ht, ws, wt, up, 6, **kw)
    assert out.per_token.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert torch.allclose(out.per_token, ref, atol=1e-5)
    assert torch.allclose(gh.float(), ref_gh.float(), atol=atol)
    assert torch.allclose(gw.float(), ref_gw.float(), atol=atol)


def test_gradients_match_finite_differences():
    hs, ht, ws, wt, up, _ = _inputs(torch.float64, seed=2)
    hs, ht, ws, wt = hs[:4], ht[:4], ws[:6, :3].contiguous(), wt[:6, :3].contiguous()
    hs, ht, up = hs[:, :3].contiguous(), ht[:, :3].contiguous(), up[:4]
    kw = dict(alpha=0.5, topk=3, add_tail=True, chunk_tokens=2)
    h = hs.clone().requires_grad_(True)
    w = ws.clone().requires_grad_(True)
    (chunked_divergence(h, ht, w, wt, **kw).per_token * up).sum().backward()

    def f(hv, wv):
        return float((chunked_divergence(hv, ht, wv, wt, **kw).per_token * up).sum())

    eps = 1e-6
    for param, grad, is_hidden in ((hs, h.grad, True), (ws, w.grad, False)):
        numeric = torch.zeros_like(param)
        for i in range(param.numel()):
            plus, minus = param.clone(), param.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            fp = f(plus, ws) if is_hidden else f(hs, plus)
            fm = f(minus, ws) if is_hidden else f(hs, minus)
            numeric.view(-1)[i] = (fp - fm) / (2 * eps)
        assert torch.allclose(grad, numeric, atol=1e-7, rtol=1e-6)


def test_teacher_equal_to_student_gives_zero_loss_and_gradient():
    hs, _, ws, _, up, _ = _inputs(torch.float64, seed=3)
    out, gh, gw = _chunked(hs, hs, ws, ws, up, 5, alpha=0.5, topk=4, add_tail=True)
    assert out.per_token.abs().max() < 1e-12
    assert gh.abs().max() < 1e-12 and gw.abs().max() < 1e-12


def test_no_gradient_to_teacher_and_only_hidden_when_weight_frozen():
    hs, ht, ws, wt, _, _ = _inputs(torch.float32, seed=4)
    ht = ht.clone().requires_grad_(True)
    wt = wt.clone().requires_grad_(True)
    h = hs.clone().requires_grad_(True)
    chunked_divergence(h, ht, ws, wt, alpha=1.0, topk=None, add_tail=True, chunk_tokens=7).per_token.sum().backward()
    assert ht.grad is None and wt.grad is None and ws.grad is None
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_tied_student_teacher_weight_accumulates_once():
    # A live teacher sharing the student's LM head: the weight gets only the student's gradient.
    hs, ht, ws, _, up, _ = _inputs(torch.float64, seed=5)
    kw = dict(alpha=0.5, topk=None, add_tail=True)
    w = ws.clone().requires_grad_(True)
    (chunked_divergence(hs, ht, w, w, chunk_tokens=4, **kw).per_token * up).sum().backward()
    _, _, ref_gw = _straightforward(hs, ht, ws, ws, up, **kw)
    assert torch.allclose(w.grad, ref_gw, atol=1e-13)


def test_chunked_token_logprobs_value_and_gradient():
    hs, _, ws, _, up, ids = _inputs(torch.float64, seed=6)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    got = chunked_token_logprobs(h, w, ids, chunk_tokens=4)
    (got * up).sum().backward()
    h2, w2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = token_logprobs(h2 @ w2.t(), ids)
    (ref * up).sum().backward()
    assert torch.allclose(got, ref, atol=1e-13)
    assert torch.allclose(h.grad, h2.grad, atol=1e-13) and torch.allclose(w.grad, w2.grad, atol=1e-13)


def test_chunked_token_logprobs_bf16_matches_straightforward():
    hs, _, ws, _, up, ids = _inputs(torch.bfloat16, seed=7)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    got = chunked_token_logprobs(h, w, ids, chunk_tokens=5)
    (got * up.float()).sum().backward()
    h2, w2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = token_logprobs(h2 @ w2.t(), ids)
    (ref * up.float()).sum().backward()
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(h.grad.float(), h2.grad.float(), atol=2e-2)
    assert torch.allclose(w.grad.float(), w2.grad.float(), atol=2e-2)


def test_chunked_logp_entropy_no_grad_pass():
    hs, _, ws, _, _, ids = _inputs(torch.float64, seed=8)
    logp, ent = chunked_logp_entropy(hs.requires_grad_(True), ws, ids, chunk_tokens=3)
    assert not logp.requires_grad and not ent.requires_grad
    assert torch.allclose(logp, token_logprobs(hs @ ws.t(), ids), atol=1e-13)
    assert torch.allclose(ent, token_entropy(hs @ ws.t()), atol=1e-13)
    none, ent2 = chunked_logp_entropy(hs, ws, None, chunk_tokens=50)
    assert none is None and torch.allclose(ent, ent2, atol=1e-13)


def test_bad_inputs_name_what_to_fix():
    hs, ht, ws, wt, _, ids = _inputs(torch.float32)
    kw = dict(alpha=0.5, topk=None, add_tail=True)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_divergence(hs, ht, ws, wt, chunk_tokens=0, **kw)
    with pytest.raises(ValueError, match=r"\(V, H\)"):
        chunked_divergence(hs, ht, ws.t(), wt, chunk_tokens=4, **kw)
    with pytest.raises(ValueError, match="same tokens"):
        chunked_divergence(hs, ht[:-1], ws, wt, chunk_tokens=4, **kw)
    with pytest.raises(ValueError, match="sampled_ids"):
        chunked_divergence(hs, ht, ws, wt, chunk_tokens=4, sampled_ids=ids[:-1], **kw)
    with pytest.raises(ValueError, match="alpha"):
        chunked_divergence(hs, ht, ws, wt, chunk_tokens=4, alpha=2.0, topk=None, add_tail=True)
