"""R rollout replicas as one object for the driver: prompts split evenly, results in order."""

from __future__ import annotations

import ray

from sdpo.config import Config
from sdpo.rollout.base import Completion
from sdpo.rollout.worker import RolloutWorker


class RolloutPool:
    def __init__(self, cfg: Config, model_path: str):
        r = cfg.rollout
        opts = dict(num_cpus=r.num_cpus_per_replica, num_gpus=r.num_gpus_per_replica)
        self.workers = [
            RolloutWorker.options(**opts).remote(r.engine, model_path, r.dtype, r.kv_cache_gib, cfg.seed + i, r.torch_threads_per_replica)
            for i in range(r.replicas)
        ]
        self.engine_kind = ray.get(self.workers[0].engine_kind.remote())

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, stop_token_ids: list[int], seed: int) -> list[list[Completion]]:
        size, extra = divmod(len(prompts), len(self.workers))
        refs, start = [], 0
        for i, worker in enumerate(self.workers):
            end = start + size + (i < extra)
            if end > start:
                refs.append(worker.generate.remote(prompts[start:end], n=n, temperature=temperature, top_p=top_p,
                                                   max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, seed=seed + 7919 * i))
            start = end
        return [group for part in ray.get(refs) for group in part]

    def load_weights(self, path: str, version: int) -> None:
        # Every replica reads the same file: the learner wrote it once, nothing passes the driver.
        ray.get([w.load_weights.remote(path, version) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
