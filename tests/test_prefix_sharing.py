"""Shared-prefix packing (learner.share_prompts): samples with identical prompts packed once give the
logits, the losses of every objective and the gradients of unshared packing, to float rounding.
Single process, the tiny learner model; the 2-rank FSDP2 step is in test_learner_packing.py."""

import random

import pytest
import torch

from sdpo.batch import TrainSample
from sdpo.config import LossConfig
from sdpo.learner.micro_batches import (
    plan_micro_batches,
    shared_packed_length,
    shares_prompts,
)
from sdpo.learner.model import load_causal_lm, response_hidden, response_logits
from sdpo.learner.objective import MicroBatch, Scores, Totals, micro_batch_loss
from sdpo.learner.packing import PACKED_SDPA, pack
from sdpo.recipe import load_config

VOCAB = 100
CPU = torch.device("cpu")


def shared_batch(seed: int = 0, sizes=(1, 2, 5, 3, 1)) -> list[TrainSample]:
    """Prompts shared by 1, 2 and many samples, of mixed lengths, interleaved (a group's samples are
    not adjacent); siblings of a prompt share one of two teacher prompts (the demonstration)."""
    rng = random.Random(seed)
    samples = []
    for size in sizes:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 30))]
        teachers = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 20))] + prompt for _ in range(2)]
        for k in range(size):
            response = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
            samples.append(TrainSample(prompt, response, [-rng.random() * 3 for _ in response], teachers[k % 2],
                                       sd_mask=int(rng.random() < 0.8), advantage=rng.random() - 0.5,
                                       success=int(rng.random() < 0.5)))
    rng.shuffle(samples)
    return samples


def assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to fp32 summation order: a different order of the same sums moves entries by a
    few ulps of the tensor's largest terms, however small the entry itself."""
    assert (got - ref).abs().max() <= rel * ref.abs().max() + 1e-9


@pytest.fixture(scope="module")
def models(learner_model_dir):
    return load_causal_lm(learner_model_dir, PACKED_SDPA), load_causal_lm(learner_model_dir, PACKED_SDPA)


def test_pack_shares_each_prompt_once():
    row = pack([[1, 2, 3], [4, 5], [1, 2, 3]], [[7, 8], [9], [6]], CPU, share_prompts=True)
    assert row.input_ids[0].tolist() == [1, 2, 3, 7, 8, 6, 4, 5, 9]
    assert row.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2]  # responses continue from their prompt
    # sample order is kept: sample 0 from the prompt's last position, then its own; sample 2 likewise
    assert row.response_rows.tolist() == [2, 3, 7, 2]
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[1], []], [[2], [3]], CPU, share_prompts=True)


@pytest.mark.parametrize("chunked", [False, True])
def test_shared_forward_and_gradients_equal_unshared(models, chunked):
    unshared, shared = models
    batch = shared_batch()
    for prompts in ([s.prompt_ids for s in batch], [s.teacher_prompt_ids for s in batch]):
        responses = [s.response_ids for s in batch]
        outputs = []
        for model, share in ((unshared, False), (shared, True)):
            model.zero_grad(set_to_none=True)
            if chunked:  # the memory-lean path: final hidden states at the response rows
                out = model.lm_head(response_hidden(model, prompts, responses, CPU, packed=True, share_prompts=share))
            else:
                out = response_logits(model, prompts, responses, CPU, packed=True, share_prompts=share)
            # a loss that weighs every row differently, so a misplaced row changes the gradient
            (out.log_softmax(-1)[:, :7] * torch.linspace(-1, 1, out.shape[0])[:, None]).sum().backward()
            outputs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (ref, ref_grads), (got, grads) = outputs
        assert got.shape[0] == sum(map(len, responses))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for name, grad in ref_grads.items():
            assert_close_to_scale(grads[name], grad)


@pytest.mark.parametrize("objective,chunk", [("sdpo", 0), ("sdpo", 5), ("grpo", 0), ("routed", 0), ("routed", 5), ("hybrid", 0)])
def test_every_objective_gives_the_same_loss_and_gradients(models, objective, chunk):
    unshared, shared = models
    batch = shared_batch(seed=1)
    cfg = LossConfig(objective=objective, topk=20, chunk_tokens=chunk or None)
    totals = Totals.of(batch)
    sampled = [t for s in batch for t in s.response_ids]
    mb = MicroBatch(sampled=torch.tensor(sampled),
                    seq_index=torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([len(s.response_ids) for s in batch])),
                    rollout_logp=torch.tensor([lp for s in batch for lp in s.rollout_logprobs]),
                    sd_mask=torch.tensor([s.sd_mask for s in batch], dtype=torch.float32),
                    advantage=torch.tensor([s.advantage for s in batch], dtype=torch.float32),
                    success=torch.tensor([s.success for s in batch], dtype=torch.float32))

    def scores(model, prompts, share):
        responses = [s.response_ids for s in batch]
        if not chunk:
            return Scores(logits=response_logits(model, prompts, responses, CPU, packed=True, share_prompts=share))
        hidden = response_hidden(model, prompts, responses, CPU, packed=True, share_prompts=share)
        return Scores(hidden=hidden, weight=model.lm_head.weight, chunk_tokens=chunk)

    results = []
    for model, share in ((unshared, False), (shared, True)):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # the teacher: the same weights on the teacher prompts, no gradient
            teacher = scores(model, [s.teacher_prompt_ids for s in batch], share)
        loss, stats = micro_batch_loss(cfg, scores(model, [s.prompt_ids for s in batch], share), teacher, mb, None, totals)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        assert_close_to_scale(grads[name], grad)


# --- planning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks,budget", [(1, 60), (2, 120), (2, 2000), (4, 90), (2, 10)])
def test_shared_plan_keeps_groups_together_and_counts_a_prompt_once(ranks, budget):
    batch = shared_batch(seed=2, sizes=(8, 8, 8, 4, 2, 1, 1))  # 32 samples
    plans = plan_micro_batches(batch, ranks, 8, budget, share_prompts=True)
    assert len({len(plan) for plan in plans}) == 1, "every rank must run the same number of micro-batches"
    placed = [s for plan in plans for micro in plan for s in micro]
    assert sorted(map(id, placed)) == sorted(map(id, batch))
    micros = [micro for plan in plans for micro in plan]
    for micro in micros:
        assert micro and (shared_packed_length(micro) <= budget or len(micro) == 1)
    if budget >= 2000:  # everything fits: one row per rank, each prompt in exactly one of them
        assert all(len(plan) == 1 for plan in plans)
        for prompt in {tuple(s.prompt_ids) for s in batch}:
            assert sum(any(tuple(s.prompt_ids) == prompt for s in m) for m in micros) == 1
    # Counted once, the same samples take fewer micro-batches than unshared planning needs.
    assert len(micros) <= sum(len(plan) for plan in plan_micro_batches(batch, ranks, 8, budget))


def test_sharing_is_on_for_packed_sdpa_rows_only():
    def decide(*overrides):
        return shares_prompts(load_config(None, list(overrides)))

    assert decide() == (False, None)  # padded micro-batches
    assert decide("learner.max_tokens_per_micro_batch=512") == (True, None)
    assert decide("learner.max_tokens_per_micro_batch=512", "learner.share_prompts=false") == (False, None)
    on, why = decide("learner.max_tokens_per_micro_batch=512", "device=cuda", "learner.num_gpus_per_rank=1",
                     "rollout.num_gpus_per_replica=1", "learner.mixed_precision=bf16")
    assert not on and "flash" in why
    on, why = decide("learner.max_tokens_per_micro_batch=512", "model.attn_implementation=eager")
    assert not on and "sdpa_packed" in why
