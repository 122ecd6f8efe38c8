"""The FSDP2 learner: splitting a batch over ranks and micro-batches changes nothing, and the EMA
teacher moves by exactly its rate."""

import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from sdpo.batch import TrainSample
from sdpo.learner.group import LearnerGroup, balance
from sdpo.learner.model import load_causal_lm, response_logits
from sdpo.learner.objective import MicroBatch, Scores, Totals, micro_batch_loss
from sdpo.recipe import load_config
from sdpo.rollout.base import Sampling
from sdpo.rollout.hf_engine import HFEngine
from sdpo.tiny.model import tiny_model_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def model_path(learner_model_dir):
    return learner_model_dir


def make_batch(n: int) -> list[TrainSample]:
    rng = random.Random(0)
    batch = []
    for i in range(n):
        prompt = [rng.randrange(100) for _ in range(rng.randint(3, 8))]
        response = [rng.randrange(100) for _ in range(rng.randint(1, 6))]
        teacher = [rng.randrange(100) for _ in range(rng.randint(10, 20))] + prompt
        logps = [-rng.random() * 5 for _ in response]
        advantage = [1.0, -0.5, 0.0][i % 3] * (1 + i / 12)
        batch.append(TrainSample(prompt, response, logps, teacher, sd_mask=int(i % 3 != 0), advantage=advantage,
                                 success=int(i % 3 == 0)))
    return batch


def step_config(ranks, micro, *overrides):
    return load_config(None, [f"learner.world_size={ranks}", f"learner.samples_per_micro_batch={micro}",
                              "optimizer.lr=1e-2", "optimizer.warmup_steps=0", "teacher.update_rate=0.5", "loss.topk=20",
                              "prompts_per_step=4", "rollout.samples_per_prompt=3", *overrides])


def one_step(model_path, tmp_path, ranks, micro, *overrides, teacher=True, batch=None):
    cfg = step_config(ranks, micro, *overrides)
    group = LearnerGroup(cfg, model_path)
    tag = f"{ranks}{micro}{abs(hash(overrides))}"
    try:
        stats = group.train_step(batch or make_batch(12))
        weights = load_file(group.export_weights(str(tmp_path / f"w{tag}"), 1))
        teacher = load_file(group.export_weights(str(tmp_path / f"t{tag}"), 1, teacher=True)) if teacher else None
    finally:
        group.shutdown()
    return stats, weights, teacher


SPLIT_CASES = [
    ("loss.aggregation=sequence_mean",),
    ("loss.aggregation=token_mean",),
    ("loss.objective=grpo", "loss.aggregation=token_mean"),
    ("loss.objective=hybrid", "loss.pg_weight=0.5"),
    ("loss.top_entropy_quantile=0.5", "loss.topk=null"),
    # Full vocabulary: a random model has near-ties in its top-k, which float noise in the first
    # update would reorder before the second.
    ("optimizer.updates_per_batch=2", "loss.objective=hybrid", "loss.topk=null"),
    # Two mini-batches, one step each; the off-policy weight of the second is against the first pass.
    ("optimizer.mini_batches_per_batch=2", "loss.objective=hybrid", "loss.topk=null", "rollout.temperature=0.7"),
    ("loss.objective=routed", "loss.aggregation=token_mean"),
]


@pytest.mark.parametrize("overrides", SPLIT_CASES, ids=lambda o: ",".join(o))
def test_ranks_and_micro_batches_do_not_change_the_step(model_path, tmp_path, overrides):
    keeps_teacher = "loss.objective=grpo" not in overrides
    ref_stats, ref_weights, _ = one_step(model_path, tmp_path, 1, 12, *overrides, teacher=keeps_teacher)
    stats, weights, teacher = one_step(model_path, tmp_path, 2, 2, *overrides, teacher=keeps_teacher)
    updates = 2 if "optimizer.updates_per_batch=2" in overrides or "optimizer.mini_batches_per_batch=2" in overrides else 1
    # A second update starts from weights that already differ by Adam's float noise (below), so
    # its gradient norm can only agree to ~1e-2.
    assert stats["learn/loss"] == pytest.approx(ref_stats["learn/loss"], rel=1e-5)
    assert stats["learn/grad_norm"] == pytest.approx(ref_stats["learn/grad_norm"], rel=1e-4 if updates == 1 else 1e-2)
    initial = Qwen2ForCausalLM.from_pretrained(model_path).state_dict()
    for name, tensor in ref_weights.items():
        assert not torch.equal(tensor, initial[name]) or "norm" in name  # the step moved the weights
        # Adam divides by |grad|: where a gradient is ~1e-9, float summation order alone moves the
        # update by a fraction of the step (lr 1e-2), hence an absolute tolerance of 2% of a step.
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=2e-4 * updates)
        if keeps_teacher:
            # EMA with rate 0.5, once per generation batch (teacher.update_every=batch), applied
            # shard by shard: halfway between the start and the student.
            torch.testing.assert_close(teacher[name], 0.5 * initial[name] + 0.5 * weights[name], rtol=0, atol=1e-6)


def test_teacher_kinds(model_path, tmp_path):
    initial = Qwen2ForCausalLM.from_pretrained(model_path).state_dict()
    # Two updates on one batch: in the second, the live policy has moved away from the initial model.
    two = "optimizer.updates_per_batch=2"
    frozen, _, frozen_teacher = one_step(model_path, tmp_path, 2, 6, two, "teacher.kind=frozen")
    for name, tensor in frozen_teacher.items():
        assert torch.equal(tensor, initial[name])  # a frozen teacher never moves
    live, _, _ = one_step(model_path, tmp_path, 2, 6, two, "teacher.kind=live", teacher=False)
    assert live["learn/loss"] != pytest.approx(frozen["learn/loss"], rel=1e-3)
    # trust_region interpolates logits between the initial model (rate 0) and the live policy (rate 1).
    tr0, _, _ = one_step(model_path, tmp_path, 2, 6, two, "teacher.kind=trust_region", "teacher.update_rate=0.0")
    tr1, _, _ = one_step(model_path, tmp_path, 2, 6, two, "teacher.kind=trust_region", "teacher.update_rate=1.0")
    assert tr0["learn/loss"] == pytest.approx(frozen["learn/loss"], rel=1e-5)
    assert tr1["learn/loss"] == pytest.approx(live["learn/loss"], rel=1e-5)
    # A separate checkpoint as teacher: a different model gives a different loss, and stays put.
    other = tmp_path / "other"
    torch.manual_seed(1)
    Qwen2ForCausalLM(tiny_model_config(100)).save_pretrained(other)
    ckpt, _, ckpt_teacher = one_step(model_path, tmp_path, 2, 6, two, "teacher.kind=checkpoint", f"teacher.path={other}")
    assert ckpt["learn/loss"] != pytest.approx(frozen["learn/loss"], rel=1e-3)
    reference = Qwen2ForCausalLM.from_pretrained(other).state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in ckpt_teacher.items())


def test_balance_gives_equal_counts_and_even_tokens():
    batch = make_batch(12)
    shards = balance(batch, 2)
    assert [len(s) for s in shards] == [6, 6]
    assert sorted(id(s) for shard in shards for s in shard) == sorted(id(s) for s in batch)
    tokens = [sum(s.num_tokens for s in shard) for shard in shards]
    assert abs(tokens[0] - tokens[1]) <= max(s.num_tokens for s in batch)


CHUNK_CASES = [
    (),
    ("loss.objective=hybrid", "loss.top_entropy_quantile=0.5"),
    ("loss.full_logit_distillation=false", "loss.alpha=1.0"),
    ("teacher.kind=trust_region", "teacher.update_rate=0.3", "optimizer.updates_per_batch=2", "loss.topk=null"),
]


@pytest.mark.parametrize("overrides", CHUNK_CASES, ids=lambda o: ",".join(o) or "default")
def test_chunked_loss_is_the_same_step(model_path, tmp_path, overrides):
    """loss.chunk_tokens computes logits from hidden states a few rows at a time; the step must
    not change (values and weights to float tolerance), through FSDP2 and every objective."""
    keeps_teacher = "teacher.kind=trust_region" not in overrides
    ref_stats, ref_weights, _ = one_step(model_path, tmp_path, 2, 3, *overrides, teacher=keeps_teacher)
    stats, weights, _ = one_step(model_path, tmp_path, 2, 3, *overrides, "loss.chunk_tokens=5", teacher=keeps_teacher)
    # The LM head runs as a (5, H) x (H, V) matmul instead of inside the model: float rounding differs
    # by ~1e-7 per logit, and a divergence between two near-equal distributions is small (~1e-4).
    assert stats["learn/loss"] == pytest.approx(ref_stats["learn/loss"], rel=1e-4)
    assert stats["learn/grad_norm"] == pytest.approx(ref_stats["learn/grad_norm"], rel=1e-4)
    for name, tensor in ref_weights.items():
        # Adam turns a ~1e-9 gradient difference on a near-zero gradient into up to a whole step
        # (lr 1e-2) of difference, so: nearly every weight to 1e-4, and none beyond two steps.
        close = torch.isclose(weights[name], tensor, rtol=1e-4, atol=1e-4)
        assert close.float().mean() > 0.999, name
        assert (weights[name] - tensor).abs().max() <= 2e-2 * (2 if "optimizer.updates_per_batch=2" in overrides else 1), name


def _tensors(samples):
    """A MicroBatch of ``samples``, written out here rather than borrowed from the worker."""
    return MicroBatch(
        sampled=torch.tensor([t for s in samples for t in s.response_ids]),
        seq_index=torch.tensor([i for i, s in enumerate(samples) for _ in s.response_ids]),
        rollout_logp=torch.tensor([lp for s in samples for lp in s.rollout_logprobs]),
        sd_mask=torch.tensor([float(s.sd_mask) for s in samples]),
        advantage=torch.tensor([s.advantage for s in samples]),
        success=torch.tensor([float(s.success) for s in samples]))


def test_mini_batches_are_one_step_each_against_a_plain_replay(model_path, tmp_path):
    """optimizer.mini_batches_per_batch=2 on 2 FSDP2 ranks equals, step for step, a plain
    single-process loop: two AdamW steps, each on its half of the batch (normalized by that half),
    the second weighted against the first-pass log-probs, logits divided by the temperature, and
    the EMA teacher moved once at the end."""
    overrides = ("optimizer.mini_batches_per_batch=2", "loss.topk=null", "rollout.temperature=0.7", "loss.objective=hybrid")
    stats, weights, teacher = one_step(model_path, tmp_path, 2, 2, *overrides)
    cfg = step_config(1, 12, *overrides)

    student = load_causal_lm(model_path, "sdpa")
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    frozen = load_causal_lm(model_path, "sdpa").eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    cpu = torch.device("cpu")

    def scores(model, samples, prompts):
        return Scores(logits=response_logits(model, prompts, [s.response_ids for s in samples], cpu)).tempered(0.7)

    batch = make_batch(12)
    minis = [batch[:6], batch[6:]]
    with torch.no_grad():
        first_pass = scores(student, minis[1], [s.prompt_ids for s in minis[1]]).token_logprobs(_tensors(minis[1]).sampled)
    losses = []
    for j, mini in enumerate(minis):
        with torch.no_grad():
            t = scores(frozen, mini, [s.teacher_prompt_ids for s in mini])
        loss, _ = micro_batch_loss(cfg.loss, scores(student, mini, [s.prompt_ids for s in mini]), t, _tensors(mini),
                                   None if j == 0 else first_pass, Totals.of(mini))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert stats["learn/loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    for name, tensor in student.state_dict().items():
        # Adam divides by |grad|: on a ~1e-9 gradient, summation order alone (FSDP's reduction vs one
        # process) moves an update by up to a step (lr 1e-2), so: nearly every weight to 2e-4 per
        # step, none beyond the two steps.
        close = torch.isclose(weights[name], tensor, rtol=1e-4, atol=4e-4)
        assert close.float().mean() > 0.999 and (weights[name] - tensor).abs().max() <= 2e-2, name
        torch.testing.assert_close(teacher[name], 0.5 * initial[name] + 0.5 * weights[name], rtol=0, atol=1e-6)


def test_teacher_update_every_optimizer_step(model_path, tmp_path):
    """TRL's cadence: with two optimizer steps per batch the EMA (rate 0.5) moves twice:
    0.25 initial + 0.25 after-step-1 + 0.5 after-step-2. The first step is the one-update step."""
    initial = Qwen2ForCausalLM.from_pretrained(model_path).state_dict()
    _, after_one, _ = one_step(model_path, tmp_path, 2, 6, teacher=False)
    _, after_two, teacher = one_step(model_path, tmp_path, 2, 6, "optimizer.updates_per_batch=2",
                                     "teacher.update_every=optimizer_step")
    moved = 0
    for name, tensor in after_two.items():
        expected = 0.25 * initial[name] + 0.25 * after_one[name] + 0.5 * tensor
        torch.testing.assert_close(teacher[name], expected, rtol=0, atol=1e-5)
        moved += not torch.allclose(teacher[name], 0.5 * initial[name] + 0.5 * tensor, atol=1e-5)
    assert moved  # and it is not the once-per-batch teacher


def test_rollout_is_weight_is_one_with_identical_weights_at_temperature(model_path, tmp_path):
    """A real engine (HF) samples at T=0.7 from the very weights the learners hold: the learners,
    dividing their logits by rollout.temperature, read a mean IS weight of 1."""
    # A peaked distribution, so that tempering matters: scale the LM head of the engine and learners alike.
    peaked = tmp_path / "peaked"
    model = Qwen2ForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(peaked)
    engine = HFEngine(str(peaked), dtype="float32", device="cpu")
    prompts = [s.prompt_ids for s in make_batch(4)]
    groups = engine.generate(prompts, Sampling(n=3, temperature=0.7, top_p=1.0, max_new_tokens=6, stop_token_ids=(), seed=0))
    batch = [TrainSample(p, c.token_ids, c.logprobs, p, sd_mask=1) for p, g in zip(prompts, groups) for c in g]
    tempered, _, _ = one_step(str(peaked), tmp_path, 2, 3, "rollout.temperature=0.7", teacher=False, batch=batch)
    untempered, _, _ = one_step(str(peaked), tmp_path, 2, 3, "rollout.temperature=1.0", teacher=False, batch=batch)
    print(f"mean IS weight at T=0.7: {tempered['learn/is_weight_mean']:.6f} (learner at T=1: {untempered['learn/is_weight_mean']:.4f})")
    assert tempered["learn/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert tempered["learn/rollout_logp_gap_abs"] < 1e-4
    assert abs(untempered["learn/is_weight_mean"] - 1.0) > 0.02


def test_teacher_guard_hands(model_path, tmp_path):
    """snapshot / reset / freeze on real FSDP2 ranks: reset puts the snapshot back exactly, and a
    frozen teacher does not move in later steps."""
    cfg = step_config(2, 6)
    group = LearnerGroup(cfg, model_path)
    try:
        def teacher(tag):
            return load_file(group.export_weights(str(tmp_path / tag), 1, teacher=True))

        start = teacher("t0")
        group.call("snapshot_teacher")
        group.train_step(make_batch(12))
        moved = teacher("t1")
        assert any(not torch.equal(moved[n], start[n]) for n in start)
        group.call("reset_teacher")
        assert all(torch.equal(t, start[n]) for n, t in teacher("t2").items())
        group.call("freeze_teacher")
        group.train_step(make_batch(12))
        assert all(torch.equal(t, start[n]) for n, t in teacher("t3").items())
    finally:
        group.shutdown()
