"""LoRA on the FSDP2 learner (model.lora): the teacher as a second set of adapter values on the one
base (rate 0: the initial adapters, rate 1: the live ones), checkpoints that resume exactly,
exports that PEFT and transformers load, and an engine that computes what the learner does after a sync."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_learner import make_batch
from transformers import AutoModelForCausalLM

from sdpo.learner.group import LearnerGroup
from sdpo.recipe import load_config
from sdpo.rollout import make_engine, vllm_available

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]

LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8", "optimizer.lr=5e-2",
        "optimizer.warmup_steps=0", "loss.topk=20", "prompts_per_step=4", "rollout.samples_per_prompt=3"]
PROMPTS = [[1, 5, 6, 7], [1, 9, 3]]
RESPONSES = [[10, 11, 12], [20, 21, 22, 23]]


def group_of(model_dir, ranks, *overrides) -> LearnerGroup:
    cfg = load_config(None, [*LORA, f"learner.world_size={ranks}", "learner.samples_per_micro_batch=6", *overrides])
    return LearnerGroup(cfg, model_dir)


def logits(group: LearnerGroup, teacher: bool = False) -> torch.Tensor:
    return group.call("response_logits", PROMPTS, RESPONSES, teacher)[0]


def base_logits(model_dir) -> torch.Tensor:
    from sdpo.learner.model import response_logits

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return response_logits(model, PROMPTS, RESPONSES, torch.device("cpu"))


def test_adapter_teacher_rate_0_is_the_initial_model_and_rate_1_the_live_one(learner_model_dir):
    base = base_logits(learner_model_dir)
    for rate in (0.0, 1.0):
        group = group_of(learner_model_dir, 1, f"teacher.update_rate={rate}")
        try:
            torch.testing.assert_close(logits(group, teacher=True), base, rtol=0, atol=1e-5)  # B = 0: the base model
            group.train_step(make_batch(12))
            live, teacher = logits(group), logits(group, teacher=True)
        finally:
            group.shutdown()
        assert (live - base).abs().max() > 1e-3  # the adapters learned
        torch.testing.assert_close(teacher, base if rate == 0.0 else live, rtol=0, atol=1e-5)


def test_adapter_checkpoint_resumes_exactly_and_exports_load(learner_model_dir, tmp_path):
    """Two ranks: step, checkpoint, step; a new group loads the checkpoint and takes the same second
    step (adapters, their optimizer state, the EMA teacher's adapters). The exports: a PEFT adapter
    folder and the merged weights give the learner's logits; the base checkpoint is untouched."""
    from peft import PeftModel

    ema = ("teacher.update_rate=0.5",)
    group = group_of(learner_model_dir, 2, *ema)
    try:
        group.train_step(make_batch(12))
        group.call("save_checkpoint", str(tmp_path / "ckpt"))
        group.train_step(make_batch(12)[::-1])
        expected = logits(group), logits(group, teacher=True)
        group.call("export_adapter", str(tmp_path / "adapter"))
        merged = load_file(group.export_weights(str(tmp_path / "merged"), 2))
    finally:
        group.shutdown()
    resumed = group_of(learner_model_dir, 2, *ema)
    try:
        resumed.call("load_checkpoint", str(tmp_path / "ckpt"))
        resumed.train_step(make_batch(12)[::-1])
        torch.testing.assert_close(logits(resumed), expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(resumed, teacher=True), expected[1], rtol=0, atol=1e-6)
    finally:
        resumed.shutdown()

    from sdpo.learner.model import response_logits

    base = AutoModelForCausalLM.from_pretrained(learner_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    plain = AutoModelForCausalLM.from_pretrained(learner_model_dir, dtype=torch.float32).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        for model in (peft, plain):
            torch.testing.assert_close(response_logits(model, PROMPTS, RESPONSES, torch.device("cpu")), expected[0],
                                       rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", [pytest.param("vllm", marks=pytest.mark.skipif(not vllm_available(), reason="no vllm here")), "hf"])
def test_adapter_only_sync_gives_the_engine_the_learners_log_probs(learner_model_dir, tmp_path, kind):
    """The engine keeps its base weights and applies the adapters it is sent; after each of two syncs
    its log-probs are the learner's."""
    from sdpo.weight_sync.adapters import write_adapter_folder

    group = group_of(learner_model_dir, 1)
    engine = make_engine(kind, learner_model_dir, dtype="float32", kv_cache_gib=0.25, lora_rank=4)
    try:
        for version in (1, 2):
            group.train_step(make_batch(12)[:: 3 - 2 * version])
            path = write_adapter_folder(group.call("adapter_payload")[0], str(tmp_path / f"v{version}"))
            engine.load_adapter(path, version)
            expected = torch.log_softmax(logits(group), -1).gather(1, torch.tensor(sum(RESPONSES, []))[:, None])[:, 0]
            got = torch.tensor(sum(engine.score(PROMPTS, RESPONSES), []))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    finally:
        engine.close()
        group.shutdown()
