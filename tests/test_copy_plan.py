"""sdpo/rollout/copy_plan.py: a recorded load replays as copies only where it provably can."""

from __future__ import annotations

import torch

from sdpo.rollout.copy_plan import CopyPlan


class Stacked(torch.nn.Module):
    """A loader shaped like vLLM's: q, k and v go into row blocks of one stacked weight whose padding
    rows are zeroed, the norm is copied whole, and a tied lm_head in the checkpoint is skipped."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.full((8, 4), 7.0), requires_grad=False)
        self.norm = torch.nn.Parameter(torch.zeros(4), requires_grad=False)

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if name in ("q", "k", "v"):
                self.qkv.data.narrow(0, 2 * "qkv".index(name), 2).copy_(self.prepare(tensor))
                self.qkv[6:].data.fill_(0)
                loaded.add("qkv")
            elif name == "norm":
                self.norm.data.copy_(tensor)
                loaded.add("norm")
        return loaded

    def prepare(self, tensor):
        return tensor


class Transposing(Stacked):
    def prepare(self, tensor):
        return tensor.t().contiguous().t()  # a copy of the values, not the incoming tensor itself


class Overwriting(Stacked):
    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self.norm.data.fill_(1.0)  # a constant over a copied tensor: replaying fills first would undo it
        return loaded


class Scaling(Stacked):
    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self.norm.data.mul_(2.0)  # a write that is neither a copy nor a constant
        return loaded


def checkpoint(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.randn(2, 4, generator=g)) for n in "qkv"] + [("norm", torch.randn(4, generator=g)),
                                                                   ("lm_head", torch.randn(3, generator=g))]


def test_a_recorded_load_replays_as_copies():
    model, reference = Stacked(), Stacked()
    loaded, plan = CopyPlan.record(model, model.load_weights, iter(checkpoint(0)))
    assert loaded == {"qkv", "norm"} and plan is not None and plan.ignored == {"lm_head"}
    reference.load_weights(checkpoint(0))
    assert torch.equal(model.qkv, reference.qkv) and torch.equal(model.norm, reference.norm)  # the recording loaded

    assert len(plan.fills) == 3 and plan.apply(iter(checkpoint(1)), load=None) == {"qkv", "norm"}
    reference.load_weights(checkpoint(1))
    assert torch.equal(model.qkv, reference.qkv) and torch.equal(model.norm, reference.norm)
    assert not model.qkv[6:].any()

    # a name the recording never saw goes through the model's loader
    calls = []
    plan.apply(iter([("q", torch.ones(2, 4)), ("extra", torch.ones(1))]), load=lambda pairs: calls.append(pairs) or {"x"})
    assert [n for n, _ in calls[0]] == ["extra"] and torch.equal(model.qkv[:2], torch.ones(2, 4))

    assert plan.still_valid()
    model.qkv.data = torch.zeros(6, 4)  # new memory: the recorded views would write into the old one
    assert not plan.still_valid()


def test_a_load_that_is_not_plain_copies_is_not_recorded():
    for kind in (Transposing, Overwriting, Scaling):
        model, reference = kind(), kind()
        loaded, plan = CopyPlan.record(model, model.load_weights, iter(checkpoint(0)))
        reference.load_weights(checkpoint(0))
        assert plan is None and loaded == {"qkv", "norm"}, kind.__name__
        # and the load itself stands, untouched by the check
        assert torch.equal(model.qkv, reference.qkv) and torch.equal(model.norm, reference.norm), kind.__name__


def test_a_load_that_misses_a_parameter_is_not_recorded():
    model = Stacked()
    _, plan = CopyPlan.record(model, model.load_weights, iter([w for w in checkpoint(0) if w[0] != "norm"]))
    assert plan is None  # the replay over NaN could not give the norm back
