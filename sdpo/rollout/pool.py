"""R rollout replicas as one object for the driver.

- Prompts are balanced across replicas by count and by expected tokens, and the results come back
  in prompt order.
- Every completion carries the policy version of the weights that sampled it.
- A replica that dies (its process crashed, it was killed) is replaced by a new actor that reloads
  the last weights, and its share of the call is retried with the same seed, so the call returns
  what it would have returned. At most `rollout.max_replica_restarts` replacements per run.
- `sync_weights` moves new weights by the configured transport (see sdpo/weight_sync/__init__.py).
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from sdpo.cluster import start_actor
from sdpo.config import Config
from sdpo.dealing import snake_deal
from sdpo.placement import check_placement, engine_settings, model_max_positions
from sdpo.rollout.base import Completion, Sampling
from sdpo.rollout.worker import RolloutWorker
from sdpo.weight_sync import broadcast_backend

_REPLICA_SEED_STRIDE = 7919  # replica i samples with seed + i * stride: replicas never share streams


class RolloutPool:
    def __init__(self, cfg: Config, model_path: str, placement_group=None):
        """placement_group: colocated GPUs only; replica i is placed in bundle i, which the learner
        group must share (so that replica i and learner rank i see the same GPU)."""
        self.cfg, self.model_path, self.placement_group = cfg, model_path, placement_group
        r = cfg.rollout
        check_placement(cfg)
        self.settings = engine_settings(cfg, model_max_positions(model_path))
        self.transport = self.settings.weight_sync
        lora = cfg.model.lora
        self.adapters = lora.enabled and lora.weight_sync == "adapter"  # LoRA: only adapters reach the engines
        self._last_adapter: tuple | None = None  # (payload, version, directory): what a replacement loads
        self.shares_gpu = self.settings.sleep_mode  # colocated on CUDA: each engine shares a GPU with a learner rank
        self.bucket_bytes = r.weight_sync_bucket_mib * 2**20
        self.version = 0  # the policy version every replica holds
        self.restarts = 0
        self._last_weights: tuple[str, int] | None = None  # (file, version): what a replacement reloads
        self._export = None  # (learners, directory): to write a file for a replacement (nccl / cuda_ipc)
        self._group_learners = None  # the learner group whose rank 0 the engines' broadcast group was built with
        self._response_tokens_mean: float | None = None  # measured, for balancing the next call
        self.workers = [self._start(i) for i in range(r.replicas)]
        kinds = ray.get([w.engine_kind.remote() for w in self.workers])  # also waits for every start-up
        self.engine_kind = kinds[0]
        # removed by us when a replica's process is killed (its engine cannot clean up after itself then)
        self.engine_files = ray.get([w.engine_files.remote() for w in self.workers])

    def _start(self, index: int):
        r, group, s = self.cfg.rollout, self.placement_group, self.settings
        return start_actor(RolloutWorker, (r.engine, self.model_path, s.dtype,
                                           s.kv_cache_bytes / 2**30 if s.kv_cache_bytes else None,
                                           self.cfg.seed + index, r.torch_threads_per_replica),
                           dict(max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
                                enforce_eager=s.enforce_eager, chunked_prefill=s.chunked_prefill,
                                enable_sleep_mode=s.sleep_mode, weight_sync_timeout_s=r.weight_sync_timeout_s,
                                **({"lora_rank": self.cfg.model.lora.rank} if self.adapters else {})),
                           num_cpus=r.num_cpus_per_replica, num_gpus=r.num_gpus_per_replica, placement_group=group,
                           bundle=index % group.bundle_count if group is not None else 0)

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, on_share=None) -> list[list[Completion]]:
        """``on_share(indices, groups)``: called as each replica's share arrives (in arrival order), so
        that the caller can start on it (verification) while the other replicas still generate."""
        max_new = sampling.max_new_tokens
        room = self.settings.max_model_len - max_new
        longest = max((len(p) for p in prompts), default=0)
        if longest > room:
            raise ValueError(f"a prompt of {longest} tokens does not fit the engines' context of {self.settings.max_model_len} "
                             f"tokens with {max_new} response tokens: raise rollout.max_prompt_tokens (or "
                             "rollout.max_model_len), or shorten the prompts")
        expected = self._response_tokens_mean if self._response_tokens_mean is not None else max_new
        shares = balance(prompts, len(self.workers), sampling.n, min(expected, max_new))

        def submit(i: int):
            share = sampling.with_seed(sampling.seed + _REPLICA_SEED_STRIDE * i)
            return self.workers[i].generate.remote([prompts[j] for j in shares[i]], share)

        refs = {i: submit(i) for i, share in enumerate(shares) if share}
        results: list[list[Completion] | None] = [None] * len(prompts)
        while refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=1)
            i = next(i for i, ref in refs.items() if ref == ready[0])
            try:
                groups = ray.get(refs[i])
            except RayActorError as error:  # the replica's process is gone; an error inside generate is not this
                self._replace(i, error)
                refs[i] = submit(i)
                continue
            del refs[i]
            for j, group in zip(shares[i], groups):
                results[j] = group
            if on_share is not None:
                on_share(shares[i], groups)
        lengths = [len(c.token_ids) for g in results for c in g]  # type: ignore[union-attr]
        if lengths:
            self._response_tokens_mean = sum(lengths) / len(lengths)
        return results  # type: ignore[return-value]

    def _replace(self, index: int, error: Exception) -> None:
        if self.restarts >= self.cfg.rollout.max_replica_restarts:
            raise RuntimeError(f"rollout replica {index} died and rollout.max_replica_restarts="
                               f"{self.cfg.rollout.max_replica_restarts} replacements are used up") from error
        self.restarts += 1
        started = time.perf_counter()
        ray.kill(self.workers[index], no_restart=True)  # in case it hangs rather than died
        self.engine_files[index].remove()
        if self.shares_gpu and self._export is not None:
            # vLLM starts only if gpu_memory_utilization x total memory is free (v1/worker/utils.py,
            # request_memory): the learner beside it returns its cached blocks first
            self._export[0].call("release_memory")
        self.workers[index] = worker = self._start(index)
        if self._last_adapter is not None:
            ray.get(worker.load_adapter.remote(*self._last_adapter))
        elif self.version:
            # a file holding the current version, else (the nccl / cuda_ipc transports keep none) one
            # the learners write now
            path = self._last_weights[0] if self._last_weights and self._last_weights[1] == self.version else None
            if path is None and self._export is not None:
                learners, directory = self._export
                path = learners.export_weights(directory, self.version)
                self._last_weights = (path, self.version)
            ray.get(worker.load_weights.remote(path, self.version))
        else:
            ray.get(worker.engine_kind.remote())  # wait for start-up: it has the checkpoint's weights
        self.engine_files[index] = ray.get(worker.engine_files.remote())
        self._group_learners = None  # a broadcast group that held the dead replica must be rebuilt
        print(f"[sdpo] rollout replica {index} died ({type(error).__name__}); replaced in "
              f"{time.perf_counter() - started:.1f} s with policy v{self.version} "
              f"({self.restarts}/{self.cfg.rollout.max_replica_restarts} replacements used)", flush=True)

    # ---- weights -----------------------------------------------------------------------------
    def load_weights(self, path: str, version: int) -> None:
        """Transport shm: every replica reads the file the learner wrote once; only the path
        passes the driver."""
        # first: a replica replaced during this call must come back with these weights
        self._last_weights, self.version = (path, version), version
        self._call_all("load_weights", path, version)

    def sync_weights(self, learners, version: int, directory: str) -> dict[str, float]:
        """Move the learners' current weights to every replica by this pool's transport.

        shm: `learners.export_weights(directory, version)` writes a file, replicas reload it.
        nccl / cuda_ipc: `learners.push_weights(...)` (every rank calls
        weight_sync.learner_side.push_weights) while the replicas receive."""
        self._export = (learners, directory)
        started = time.perf_counter()
        if self.adapters:
            payload = learners.call("adapter_payload")[0]
            self.load_adapter(payload, version, directory)
            return {"weight_sync/seconds": time.perf_counter() - started,
                    "weight_sync/bytes": float(len(payload["adapter_model.safetensors"]))}
        if self.shares_gpu:
            # the engines re-allocate their weights and KV cache on wake-up: the learners give back
            # the blocks their caching allocators hold first (torch.cuda.empty_cache)
            learners.call("release_memory")
        if self.transport == "shm":
            self.load_weights(learners.export_weights(directory, version), version)
        elif self.transport == "nccl":
            if self._group_learners is not learners:  # first sync, a replaced replica, or a restarted learner group
                self._join_group(learners)
            receiving = [w.receive_weights.remote(version) for w in self.workers]
            try:
                learners.push_weights(self.transport, version, self.bucket_bytes, receivers_by_rank=None)
                ray.get(receiving)
            except BaseException:
                # a sender that died mid-transfer leaves the group broken (the receivers give up after
                # rollout.weight_sync_timeout_s): the next sync builds a new one
                self._group_learners = None
                raise
            self.version = version
        else:  # cuda_ipc: each engine wakes its weights in begin_weight_update and its KV cache in finish
            learners.push_weights(self.transport, version, self.bucket_bytes,
                                  receivers_by_rank=[self.receivers_for_rank(r, learners.world_size)
                                                     for r in range(learners.world_size)])
            self.version = version
        return {"weight_sync/seconds": time.perf_counter() - started}

    def load_adapter(self, payload: dict, version: int, directory: str) -> None:
        """LoRA adapter-only sync: every replica writes the adapter folder (``payload``: its files,
        a few MB through Ray) under ``directory`` on its node and generates with it from now on."""
        self._last_adapter, self.version = (payload, version, directory), version
        self._call_all("load_adapter", payload, version, directory)

    def prepare_for_training(self) -> None:
        """Colocated: free the GPU memory the engines hold before the learner trains."""
        if self.shares_gpu:
            # weights too, as a full sync follows every step; adapter-only sync never resends the
            # base, so those engines keep their weights in host memory (level 1)
            self._call_all("sleep", 1 if self.adapters else 2)

    def receivers_for_rank(self, rank: int, world_size: int) -> list:
        """Colocated: replica i shares a GPU with learner rank i % world_size."""
        return [w for i, w in enumerate(self.workers) if i % world_size == rank]

    def join_weight_group(self, backend: str, master_addr: str, master_port: int) -> tuple[int, list]:
        """Start every replica joining the broadcast group (rank 0 is the learner's sender).
        Returns the group's world size and the refs: the sender joins now, then ray.get the refs
        (the replicas are blocked in the join until it does)."""
        ranks = ray.get([w.weight_group_ranks.remote() for w in self.workers])
        world, offset, refs = 1 + sum(ranks), 1, []
        for w, k in zip(self.workers, ranks):
            refs.append(w.join_weight_group.remote(backend, master_addr, master_port, offset, world))
            offset += k
        return world, refs

    def _join_group(self, learners) -> None:
        addr, port = learners.weight_group_address()
        backend = broadcast_backend(self.cfg.device)
        world, refs = self.join_weight_group(backend, addr, port)
        learners.call("join_weight_group", backend, addr, port, world)
        ray.get(refs)
        self._group_learners = learners

    def _call_all(self, method: str, *args) -> None:
        """One call on every replica; a replica that died is replaced (with the current weights,
        which is what the call would have given it) instead of failing the step."""
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        for i, ref in enumerate(refs):
            try:
                ray.get(ref)
            except RayActorError as error:
                self._replace(i, error)
                if method not in ("load_weights", "load_adapter"):
                    ray.get(getattr(self.workers[i], method).remote(*args))

    def versions(self) -> list[int]:
        return ray.get([w.version.remote() for w in self.workers])

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Close every engine (so that nothing it made outlives it), then kill the actors regardless."""
        ray.wait([w.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=timeout_s)
        for w in self.workers:
            ray.kill(w)
        for files in self.engine_files:  # what a close that failed or timed out left
            files.remove()


def balance(prompts: list[list[int]], replicas: int, n: int, response_tokens: float) -> list[list[int]]:
    """Prompt indices per replica: counts differ by at most one, and expected tokens (the prompt's
    prefill plus n responses) are evened out by dealing the costliest prompts first in snake order.
    Each share keeps prompt order (engines batch better with neighbours of similar length)."""
    cost = [len(p) + n * response_tokens for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -cost[i])
    return [sorted(share) for share in snake_deal(order, replicas)]
