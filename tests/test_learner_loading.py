"""The learner loads its model sharded: FSDP2 on the meta device, then each rank's rows read from
safetensors (sdpo/learner/model.py:load_sharded), instead of a full fp32 copy per rank plus a
deep-copied teacher. Two gloo ranks in spawned processes load a 34M-parameter Qwen2 (134 MiB fp32)
as student and teacher both ways: the same weights land (identical logits from the sharded
models), and the per-rank peak RSS of loading falls."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.integration

SHAPE = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             head_dim=64, intermediate_size=1536, max_position_embeddings=1024)


def _rank(rank: int, world: int, port: int, path: str, way: str, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sdpo.learner.model import load_causal_lm, load_sharded, shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    before = _reset_peak_rss_kib()
    cpu = torch.device("cpu")
    if way == "full_copy":  # what the learner did before: a whole fp32 model per rank, its deep copy as teacher
        student = load_causal_lm(path, "sdpa")
        teacher = copy.deepcopy(student).requires_grad_(False)
        teacher = shard(teacher, mesh, "no", no_grad=True)
        student = shard(student, mesh, "no")
    else:
        student = load_sharded(path, "sdpa", mesh, "no", cpu)
        teacher = load_sharded(path, "sdpa", mesh, "no", cpu, no_grad=True)
    peak_kib = _status_kib("VmHWM")
    ids = torch.arange(1, 33).view(2, 16)
    with torch.no_grad():
        logits = student(input_ids=ids).logits
        teacher_logits = teacher(input_ids=ids).logits
    # plain lists: a tensor in a queue is shared by file descriptor, which dies with this process
    results.put((way, rank, peak_kib - before, peak_kib, logits.tolist() if rank == 0 else None,
                 teacher_logits.tolist() if rank == 0 else None))
    dist.barrier()
    dist.destroy_process_group()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss_kib() -> int:
    """Reset the resident high-water mark (Linux: "5" > /proc/self/clear_refs) and return the
    resident size now, so that VmHWM later is the peak of what follows alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _load_both_ranks(path: str, way: str) -> dict:
    from tests.conftest import run_on_ranks

    got = run_on_ranks(_rank, 2, path, way)
    return {rank: dict(grew_kib=grew, peak_kib=peak, logits=logits, teacher=teacher)
            for _, rank, grew, peak, logits, teacher in got}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False)).to(torch.float32)
    path = tmp_path_factory.mktemp("loading-qwen2")
    model.save_pretrained(path)
    return str(path)


def test_sharded_loading_lands_the_same_weights_with_less_memory_per_rank(model_dir):
    old, new = _load_both_ranks(model_dir, "full_copy"), _load_both_ranks(model_dir, "sharded")
    assert torch.equal(torch.tensor(old[0]["logits"]), torch.tensor(new[0]["logits"]))
    assert torch.equal(torch.tensor(old[0]["teacher"]), torch.tensor(new[0]["teacher"]))
    embed_and_head_mib = SHAPE["vocab_size"] * SHAPE["hidden_size"] * 2 * 4 / 2**20
    for rank in (0, 1):
        old_mib, new_mib = old[rank]["grew_kib"] / 1024, new[rank]["grew_kib"] / 1024
        print(f"rank {rank}: peak RSS growth while loading: full copy {old_mib:.0f} MiB, sharded {new_mib:.0f} MiB "
              f"(peaks {old[rank]['peak_kib'] / 1024:.0f} / {new[rank]['peak_kib'] / 1024:.0f} MiB)")
        # the full-copy path holds two whole fp32 models (2 x 134 MiB) at its peak; sharded, each
        # rank holds half of each: the saving is at least the embedding and head alone
        assert new_mib < old_mib - embed_and_head_mib


def test_tied_embeddings_and_checkpointed_layers_load_sharded(tmp_path):
    """A tied head is one parameter (filled once), checkpoint wrappers keep checkpoint names, and a
    bf16 checkpoint lands in fp32 master weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from sdpo.learner.model import load_sharded

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = load_sharded(str(tmp_path), "sdpa", mesh, "no", torch.device("cpu"), checkpointing=True).eval()
        ids = torch.arange(3, 23).view(1, 20)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    finally:
        dist.destroy_process_group()
