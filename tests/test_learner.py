"""The FSDP2 learner: splitting a batch over ranks and micro-batches changes nothing, and the EMA
teacher moves by exactly its rate."""

import random

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from sdpo.batch import TrainSample
from sdpo.learner.group import LearnerGroup, balance
from sdpo.recipe import load_config
from sdpo.tiny.model import tiny_model_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    Qwen2ForCausalLM(tiny_model_config(100)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_batch(n: int) -> list[TrainSample]:
    rng = random.Random(0)
    batch = []
    for i in range(n):
        prompt = [rng.randrange(100) for _ in range(rng.randint(3, 8))]
        response = [rng.randrange(100) for _ in range(rng.randint(1, 6))]
        teacher = [rng.randrange(100) for _ in range(rng.randint(10, 20))] + prompt
        logps = [-rng.random() * 5 for _ in response]
        batch.append(TrainSample(prompt, response, logps, teacher, sd_mask=int(i % 3 != 0)))
    return batch


def one_step(model_path, tmp_path, ranks, micro, aggregation):
    cfg = load_config(None, [f"learner.world_size={ranks}", f"learner.samples_per_micro_batch={micro}",
                             f"loss.aggregation={aggregation}", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
                             "teacher.update_rate=0.5", "loss.topk=20", "prompts_per_step=4", "rollout.samples_per_prompt=3"])
    group = LearnerGroup(cfg, model_path)
    try:
        stats = group.train_step(make_batch(12))
        weights = load_file(group.export_weights(str(tmp_path / f"w{ranks}{micro}"), 1))
        teacher = load_file(group.export_weights(str(tmp_path / f"t{ranks}{micro}"), 1, teacher=True))
    finally:
        group.shutdown()
    return stats, weights, teacher


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_ranks_and_micro_batches_do_not_change_the_step(model_path, tmp_path, aggregation):
    ref_stats, ref_weights, _ = one_step(model_path, tmp_path, ranks=1, micro=12, aggregation=aggregation)
    stats, weights, teacher = one_step(model_path, tmp_path, ranks=2, micro=2, aggregation=aggregation)
    assert stats["learn/loss"] == pytest.approx(ref_stats["learn/loss"], rel=1e-5)
    assert stats["learn/grad_norm"] == pytest.approx(ref_stats["learn/grad_norm"], rel=1e-4)
    initial = Qwen2ForCausalLM.from_pretrained(model_path).state_dict()
    for name, tensor in ref_weights.items():
        assert not torch.equal(tensor, initial[name]) or "norm" in name  # the step moved the weights
        # Adam divides by |grad|: where a gradient is ~1e-9, float summation order alone moves the
        # update by a fraction of the step (lr 1e-2), hence an absolute tolerance of 1% of a step.
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-4)
        # EMA with rate 0.5, applied shard by shard: halfway between the start and the student.
        torch.testing.assert_close(teacher[name], 0.5 * initial[name] + 0.5 * weights[name], rtol=0, atol=1e-6)


def test_balance_gives_equal_counts_and_even_tokens():
    batch = make_batch(12)
    shards = balance(batch, 2)
    assert [len(s) for s in shards] == [6, 6]
    assert sorted(id(s) for shard in shards for s in shard) == sorted(id(s) for s in batch)
    tokens = [sum(s.num_tokens for s in shard) for shard in shards]
    assert abs(tokens[0] - tokens[1]) <= max(s.num_tokens for s in batch)
