"""Padding-free packed micro-batches under a token budget, activation checkpointing, bf16 and an
offloaded teacher: each gives the step the padded learner gives (real 2-rank FSDP2 on gloo)."""

import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from sdpo.batch import TrainSample
from sdpo.learner.group import LearnerGroup
from sdpo.learner.micro_batches import packed_length, plan_micro_batches, samples_to_train
from sdpo.learner.model import load_causal_lm, response_hidden, response_logits
from sdpo.learner.packing import PACKED_SDPA, pack
from sdpo.recipe import load_config

VOCAB = 100


@pytest.fixture(scope="module")
def model_path(learner_model_dir):
    return learner_model_dir  # VOCAB ids


def spread_batch(n: int, seed: int = 0, per_prompt: int = 1) -> list[TrainSample]:
    """Lengths that differ several-fold, as real rollouts do (a 4-40 token prompt, 1-30 token answer).
    ``per_prompt`` > 1: runs of that many samples share their prompt, and pairs of them their
    teacher prompt (learner.share_prompts packs each once)."""
    rng = random.Random(seed)
    batch = []
    for i in range(n):
        if i % per_prompt == 0:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 40))]
        response = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
        if i % per_prompt % 2 == 0:
            teacher = [rng.randrange(VOCAB) for _ in range(rng.randint(5, 25))] + prompt
        logps = [-rng.random() * 5 for _ in response]
        batch.append(TrainSample(prompt, response, logps, teacher, sd_mask=int(i % 4 != 0), advantage=float(i % 3) - 1))
    return batch


# --- planning: pure functions -------------------------------------------------------------------


@pytest.mark.parametrize("ranks,budget", [(1, 60), (2, 90), (2, 1000), (4, 70), (2, 10)])
def test_token_budget_plan(ranks, budget):
    batch = spread_batch(24)
    plans = plan_micro_batches(batch, ranks, 8, budget)
    counts = {len(plan) for plan in plans}
    assert len(counts) == 1, "every rank must run the same number of micro-batches"
    placed = [s for plan in plans for micro in plan for s in micro]
    assert sorted(map(id, placed)) == sorted(map(id, batch))  # each sample exactly once
    for plan in plans:
        for micro in plan:
            assert micro, "no empty micro-batch"
            load = sum(map(packed_length, micro))
            assert load <= budget or len(micro) == 1  # an oversize sample runs alone
    if budget >= 1000:
        assert counts == {1}  # everything fits in one row per rank
    rank_loads = [sum(packed_length(s) for micro in plan for s in micro) for plan in plans]
    assert max(rank_loads) - min(rank_loads) <= max(map(packed_length, batch)) + budget // 2


def test_samples_to_train_drop_those_without_signal():
    batch = spread_batch(16)  # sd_mask 0 for samples 0, 4, 8, 12
    kept = samples_to_train(batch, 2)
    assert sorted(map(id, kept)) == sorted(id(s) for s in batch if s.sd_mask)
    kept = samples_to_train(batch[:12], 3)  # 9 with signal: already a multiple of 3
    assert len(kept) == 9 and all(s.sd_mask for s in kept)
    kept = samples_to_train(batch[:12], 4)  # 9 with signal: topped up with the shortest signal-less ones
    shortest = sorted((s for s in batch[:12] if not s.sd_mask), key=lambda s: s.num_tokens)
    assert len(kept) == 12 and kept[9:] == shortest[:3]
    none = [s for s in batch if not s.sd_mask]
    kept = samples_to_train(none, 2)  # no signal anywhere: still one forward per rank
    assert len(kept) == 2 and kept == sorted(none, key=lambda s: s.num_tokens)[:2]


def test_sample_count_plan_is_the_default():
    batch = spread_batch(12)
    plans = plan_micro_batches(batch, 2, 4, None)
    assert [[len(m) for m in plan] for plan in plans] == [[4, 2], [4, 2]]
    with pytest.raises(ValueError, match="evenly over 2 learner ranks"):
        plan_micro_batches(batch[:5], 2, 4, 100)


# --- packed forward: single process ---------------------------------------------------------------


@pytest.mark.parametrize("attention", [PACKED_SDPA, "sdpa", "eager"])
def test_packed_forward_equals_padded(model_path, attention):
    batch = spread_batch(6, seed=1)
    prompts, responses = [s.prompt_ids for s in batch], [s.response_ids for s in batch]
    cpu = torch.device("cpu")
    reference = response_logits(load_causal_lm(model_path, "sdpa"), prompts, responses, cpu)
    model = load_causal_lm(model_path, attention)
    torch.testing.assert_close(response_logits(model, prompts, responses, cpu, packed=True), reference, rtol=1e-5, atol=1e-5)
    hidden = response_hidden(model, prompts, responses, cpu, packed=True)
    torch.testing.assert_close(model.lm_head(hidden), reference, rtol=1e-5, atol=1e-5)
    # Attention never crosses a sample boundary: changing sample 0 leaves every other row alone.
    changed = [[(t + 1) % VOCAB for t in prompts[0]]] + prompts[1:]
    after = response_logits(model, changed, responses, cpu, packed=True)
    first = len(responses[0])
    assert not torch.allclose(after[:first], reference[:first])
    torch.testing.assert_close(after[first:], reference[first:], rtol=1e-5, atol=1e-5)


def test_pack_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[1, 2], []], [[3], [4]], torch.device("cpu"))


# --- the whole step through FSDP2 on two ranks ------------------------------------------------------


def one_step(model_path, tmp_path, *overrides):
    cfg = load_config(None, ["learner.world_size=2", "learner.samples_per_micro_batch=3", "optimizer.lr=1e-2",
                             "optimizer.warmup_steps=0", "teacher.update_rate=0.5", "loss.topk=20",
                             "prompts_per_step=4", "rollout.samples_per_prompt=4", *overrides])
    group = LearnerGroup(cfg, model_path)
    tag = abs(hash(overrides))
    try:
        # 4 prompts x 4 samples: packed rows share each prompt once (the default learner.share_prompts)
        stats = group.train_step(spread_batch(16, per_prompt=4))
        weights = load_file(group.export_weights(str(tmp_path / f"w{tag}"), 1))
        teacher = load_file(group.export_weights(str(tmp_path / f"t{tag}"), 1, teacher=True))
    finally:
        group.shutdown()
    return stats, weights, teacher


def assert_same_step(got, ref, *, rel=1e-5, weight_tol=2e-4):
    (stats, weights, _), (ref_stats, ref_weights, _) = got, ref
    assert stats["learn/loss"] == pytest.approx(ref_stats["learn/loss"], rel=rel)
    assert stats["learn/grad_norm"] == pytest.approx(ref_stats["learn/grad_norm"], rel=10 * rel)
    assert weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        # Adam divides by |grad|: where a gradient is ~1e-9, summation order alone moves a weight
        # by a fraction of the lr 1e-2 step.
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=weight_tol)


PACKED = ("learner.max_tokens_per_micro_batch=150",)


@pytest.fixture(scope="module")
def packed_step(model_path, tmp_path_factory, local_ray):
    # A budget of ~3 samples per row: 16 samples become several micro-batches of unequal sample
    # counts; checkpointing recomputes each layer in backward; the teacher lives in host memory
    # (on CPU: the offload code path, same numbers).
    return one_step(model_path, tmp_path_factory.mktemp("packed"), *PACKED, "learner.activation_checkpointing=true",
                    "learner.teacher_offload=true")


@pytest.mark.integration
def test_packed_step_equals_padded_step(model_path, tmp_path, packed_step):
    # The hybrid objective with a zero policy-gradient weight is SDPO's step, computed on every
    # sample: pure SDPO skips the samples without a teacher signal and must not differ from it.
    padded_all_samples = one_step(model_path, tmp_path, "loss.objective=hybrid", "loss.pg_weight=0")
    assert_same_step(packed_step, padded_all_samples)
    assert packed_step[0]["learn/response_tokens"] < padded_all_samples[0]["learn/response_tokens"]
    initial = Qwen2ForCausalLM.from_pretrained(model_path).state_dict()
    _, weights, teacher = packed_step
    for name, tensor in weights.items():
        # The EMA teacher (rate 0.5), updated shard by shard: halfway between the start and the student.
        torch.testing.assert_close(teacher[name], 0.5 * initial[name] + 0.5 * tensor, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_bf16_chunked_packed_step(model_path, tmp_path, packed_step):
    """bf16 compute with the memory-lean chunked loss on packed rows: the same step to bf16 precision."""
    (stats, weights, _), (ref_stats, ref_weights, _) = one_step(
        model_path, tmp_path, *PACKED, "learner.mixed_precision=bf16", "loss.chunk_tokens=7"), packed_step
    # bf16 keeps 8 bits of mantissa: the loss agrees to ~1e-2.
    assert stats["learn/loss"] == pytest.approx(ref_stats["learn/loss"], rel=3e-2)
    assert stats["learn/grad_norm"] == pytest.approx(ref_stats["learn/grad_norm"], rel=5e-2)
    initial = Qwen2ForCausalLM.from_pretrained(model_path).state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32
    # Adam's first step is about lr * sign(gradient): the two runs move the weights the same way.
    # (k_proj biases are left out: softmax ignores them, their true gradient is 0 and only noise remains.)
    names = [n for n in ref_weights if "k_proj.bias" not in n]
    moved = torch.cat([(weights[n] - initial[n]).flatten() for n in names])
    ref_moved = torch.cat([(ref_weights[n] - initial[n]).flatten() for n in names])
    assert (torch.sign(moved) == torch.sign(ref_moved)).float().mean() > 0.95
