"""Size-based defaults (sdpo/sizing.py) and the learner's full-weights export for a weight push
(sdpo/learner/full_state.py: one rank, and the single gather of several)."""

import socket

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from transformers import Qwen2ForCausalLM

from sdpo.learner.micro_batches import shares_prompts
from sdpo.recipe import load_config
from sdpo.sizing import CPU_PACKED_TOKENS, SINGLE_RANK_MAX_PARAMS, count_params, fit_to_model
from sdpo.tiny.model import tiny_model_config


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sizing-model")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_model_config(100))
    model.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


def test_count_params_matches_the_model(model_path):
    path, params = model_path
    assert count_params(path) == params
    assert count_params("no/such/hub-name") is None


def test_small_model_on_gpu_gets_one_rank_with_a_reason(model_path):
    path, _ = model_path
    gpu = ["device=cuda", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_replica=1"]
    cfg, reasons = fit_to_model(load_config(None, [f"model.path={path}", *gpu]))
    assert cfg.learner.world_size == 1 and len(reasons) == 1 and "learner.world_size=1" in reasons[0]
    again, more = fit_to_model(cfg)  # a chosen key counts as set: a second pass changes nothing
    assert again.learner == cfg.learner and more == []


def test_cpu_keeps_two_ranks_packs_micro_batches_and_says_why(model_path):
    path, _ = model_path
    cfg, reasons = fit_to_model(load_config(None, [f"model.path={path}"]))
    assert cfg.learner.world_size == 2 and len(reasons) == 2 and "default kept" in reasons[0]
    assert cfg.learner.max_tokens_per_micro_batch == CPU_PACKED_TOKENS and "packed rows" in reasons[1]
    assert shares_prompts(cfg) == (True, None)
    # padded micro-batches when asked for (null is a setting too), or under another attention
    padded, reasons = fit_to_model(load_config(None, [f"model.path={path}", "learner.max_tokens_per_micro_batch=null"]))
    assert padded.learner.max_tokens_per_micro_batch is None and len(reasons) == 1
    eager, _ = fit_to_model(load_config(None, [f"model.path={path}", "model.attn_implementation=sdpa"]))
    assert eager.learner.max_tokens_per_micro_batch is None


def test_keys_the_user_set_are_kept(model_path):
    path, _ = model_path
    gpu = ["device=cuda", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_replica=1"]
    cfg, reasons = fit_to_model(load_config(None, [f"model.path={path}", "learner.world_size=2", *gpu]))
    assert (cfg.learner.world_size, reasons) == (2, [])


def test_large_or_unknown_models_keep_the_sharded_default(tmp_path):
    config = Qwen2ForCausalLM(tiny_model_config(100)).config
    config.vocab_size, config.hidden_size, config.intermediate_size = 150_000, 1024, 4096
    config.save_pretrained(tmp_path)
    assert count_params(str(tmp_path)) > SINGLE_RANK_MAX_PARAMS
    gpu = ["device=cuda", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_replica=1"]
    for path in (str(tmp_path), "some-org/some-hub-model"):
        cfg, _ = fit_to_model(load_config(None, [f"model.path={path}", *gpu]))
        assert cfg.learner.world_size == 2


def test_one_rank_export_equals_the_full_state_dict(model_path):
    import torch.distributed as dist

    from sdpo.learner.worker import LearnerWorker

    path, _ = model_path
    cfg = load_config(None, ["learner.world_size=1", "prompts_per_step=1", "rollout.samples_per_prompt=1"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(0, 1, cfg.model_dump_json(), path)
    worker.setup("127.0.0.1", port)
    try:
        from sdpo.learner.full_state import local_full_state

        with torch.no_grad():  # weights that differ from the checkpoint's, as after a step
            for p in worker.student.parameters():
                p.to_local().add_(0.5)
        ours = local_full_state(worker.student)
        reference = get_model_state_dict(worker.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        assert ours.keys() == reference.keys()
        for name in ours:
            assert torch.equal(ours[name], reference[name]), name
    finally:
        worker.shutdown()
        assert not dist.is_initialized()


def _gather_on_ranks(rank: int, world_size: int, port: int, directory, queue) -> None:
    """One rank of test_one_gather_is_the_per_tensor_gather: a tiny tied Qwen2 under FSDP2 on gloo."""
    import os

    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdpo.learner.full_state import full_state
    from sdpo.learner.model import shard
    from sdpo.learner.shard_file import ShardWriter

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        # 37 vocabulary rows split 19/18 (uneven shards), and the tied lm_head under its own name too
        config = Qwen2Config(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, intermediate_size=24, tie_word_embeddings=True)
        model = shard(Qwen2ForCausalLM(config), init_device_mesh("cpu", (world_size,)), "no")
        with torch.no_grad():  # every element distinct, so a misplaced row cannot pass
            for i, p in enumerate(model.parameters()):
                p.to_local().copy_(torch.randn_like(p.to_local()) + 10 * i)
        ours = full_state(model, rank, world_size)
        reference = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # the same weights written as a file by every rank at once (shard_file.py), fp32 and bf16
        writer = ShardWriter.for_model(model, rank, world_size)
        files = {dtype: writer.write(str(directory / str(dtype)), 3, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
        if rank == 0:
            differ = [name for name in reference if not torch.equal(ours[name], reference[name])]
            for dtype, path in files.items():
                assert path.endswith("weights-v3.safetensors") and os.listdir(os.path.dirname(path)) == ["weights-v3.safetensors"]
                with safe_open(path, framework="pt") as f:
                    assert f.metadata() == {"format": "pt", "sdpo_version": "3"} and set(f.keys()) == set(reference)
                    differ += [f"{name} in the {dtype} file" for name in reference
                               if not torch.equal(f.get_tensor(name), reference[name].to(dtype))]
            queue.put((list(ours), list(reference), differ))
        else:
            queue.put((ours, files))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_one_gather_is_the_per_tensor_gather(tmp_path):
    """sdpo/learner/full_state.py: the weight push's single gather gives torch's full state dict
    exactly, on 2 ranks with uneven shards and tied embeddings; the other rank gets None. And
    shard_file.py: the file every rank writes its rows into holds the same tensors (fp32 and bf16),
    under every name, with the version in its metadata, and nothing else is left in the folder."""
    from tests.conftest import run_on_ranks

    results = run_on_ranks(_gather_on_ranks, 2, tmp_path, timeout_s=120)
    (ours, reference, differ), = [r for r in results if r[0] is not None]
    assert [r for r in results if r[0] is None] == [(None, dict.fromkeys((torch.float32, torch.bfloat16)))]
    assert ours == reference and "lm_head.weight" in ours and not differ
