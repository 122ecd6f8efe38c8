"""GRPO pieces (SPEC section 6): group-relative advantages and the PPO-clip per-token loss."""

import math
import statistics

import pytest
import torch

from sdpo.loss import group_advantages, ppo_clip_per_token


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])  # group 3 has one sample
    adv = group_advantages(rewards, groups, normalize_std=True, eps=0.0)
    s0 = statistics.stdev([1, 0, 0, 1])  # unbiased, as verl
    assert adv.tolist()[:4] == pytest.approx([0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0])
    # A group whose rewards are all equal gives 0 (std 0: eps keeps the division finite).
    assert group_advantages(rewards, groups, normalize_std=True).tolist()[4:6] == [0.0, 0.0]
    # Singletons: mean 0, std 1 (verl's convention), so the advantage is the reward.
    assert adv.tolist()[6:] == pytest.approx([0.0, 0.5])


def test_dr_grpo_only_centres():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, groups, normalize_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 1.0, -1.0])


def test_groups_need_not_be_contiguous_and_ids_are_arbitrary():
    rewards = torch.tensor([1.0, 5.0, 0.0, 7.0])
    groups = torch.tensor([42, 7, 42, 7])
    a = group_advantages(rewards, groups, normalize_std=True, eps=0.0)
    s = statistics.stdev([1, 0])
    assert a.tolist() == pytest.approx([0.5 / s, -1.0 / math.sqrt(2), -0.5 / s, 1.0 / math.sqrt(2)])


def test_group_advantages_bad_shapes():
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long), normalize_std=True)


def _ratio_logp(ratios):
    return torch.log(torch.tensor(ratios, dtype=torch.float64))


@pytest.mark.parametrize(
    "ratio,adv,expected_loss,expected_grad_scale",
    [
        # inside the clip range: -A r, gradient -A r (d r / d logp = r)
        (1.1, 1.0, -1.1, -1.1),
        (0.9, -2.0, 1.8, 1.8),
        # A > 0, ratio above 1 + eps_high = 1.28: clipped, no gradient
        (1.5, 1.0, -1.28, 0.0),
        # A > 0, ratio below 1 - eps_low: the unclipped term is the max (pessimistic), gradient flows
        (0.5, 1.0, -0.5, -0.5),
        # A < 0, ratio below 1 - eps_low = 0.8: clipped at 0.8, no gradient
        (0.5, -1.0, 0.8, 0.0),
        # A < 0, ratio above 1 + eps_high: unclipped, gradient flows
        (1.5, -1.0, 1.5, 1.5),
        # clip-higher: 1.25 is inside [0.8, 1.28] (it would be clipped with a symmetric 0.2)
        (1.25, 1.0, -1.25, -1.25),
    ],
)
def test_ppo_clip_by_hand(ratio, adv, expected_loss, expected_grad_scale):
    logp = _ratio_logp([ratio]).requires_grad_(True)
    old = torch.zeros(1, dtype=torch.float64)
    loss = ppo_clip_per_token(logp, old, torch.tensor([adv], dtype=torch.float64), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(expected_loss)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(expected_grad_scale)


def test_ppo_clip_on_policy_is_the_policy_gradient():
    # ratio 1: loss -A, gradient -A d logp (REINFORCE with the group baseline).
    logp = torch.randn(5, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(5, dtype=torch.float64)
    loss = ppo_clip_per_token(logp, logp.detach(), adv, eps_low=0.2, eps_high=0.28)
    assert loss.tolist() == pytest.approx((-adv).tolist())
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx((-adv).tolist())


def test_dual_clip_caps_negative_advantage_loss():
    logp = _ratio_logp([5.0, 5.0, 2.0]).requires_grad_(True)
    adv = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    loss = ppo_clip_per_token(logp, torch.zeros(3, dtype=torch.float64), adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    assert loss.tolist() == pytest.approx([3.0, -1.28, 2.0])
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 2.0])


def test_ppo_old_logp_and_advantages_get_no_gradient():
    logp = torch.zeros(2, requires_grad=True)
    old = torch.zeros(2, requires_grad=True)
    adv = torch.ones(2, requires_grad=True)
    ppo_clip_per_token(logp, old, adv, eps_low=0.2, eps_high=0.28).sum().backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None


def test_ppo_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_per_token(x, torch.zeros(2), x, eps_low=0.2, eps_high=0.28)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clip_per_token(x, x, x, eps_low=-0.1, eps_high=0.28)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_per_token(x, x, x, eps_low=0.2, eps_high=0.28, dual_clip=0.5)
