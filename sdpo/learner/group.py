"""The learner ranks as one object for the driver: placement, rendezvous, fan-out (``call``), reduction."""

from __future__ import annotations

import time

import ray

from sdpo.batch import TrainSample
from sdpo.cluster import start_actor
from sdpo.config import Config
from sdpo.learner.micro_batches import balance, rank_plans  # noqa: F401  (balance: re-exported)
from sdpo.learner.objective import Totals
from sdpo.learner.worker import LearnerWorker


class LearnerGroup:
    def __init__(self, cfg: Config, model_path: str, placement_group=None):
        """placement_group: colocated GPUs only; rank i goes to bundle i, next to rollout replica i."""
        self.cfg = cfg
        self._timeout = cfg.learner.call_timeout_s
        size, learner = cfg.learner.world_size, cfg.learner
        self.workers = [start_actor(LearnerWorker, (rank, size, cfg.model_dump_json(), model_path),
                                    num_cpus=learner.num_cpus_per_rank, num_gpus=learner.num_gpus_per_rank,
                                    placement_group=placement_group, bundle=rank)
                        for rank in range(size)]
        addr, port = self.weight_group_address()
        self.num_params = self.call("setup", addr, port)[0]

    def call(self, method: str, *args) -> list:
        """``LearnerWorker.<method>(*args)`` on every rank at once (the ranks meet in collectives, so
        all must be called); their results in rank order. Raises as soon as a rank fails, and
        LearnerTimeout past learner.call_timeout_s."""
        return _get_all(self._timeout, [getattr(w, method).remote(*args) for w in self.workers])

    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        # optimizer.mini_batches_per_batch: disjoint mini-batches in batch order (whole prompt
        # groups), each planned over all ranks and normalized by its own totals: one step each.
        count = self.cfg.optimizer.mini_batches_per_batch
        size = len(samples) // count
        minis = [samples[i * size : (i + 1) * size] for i in range(count)]
        per_rank: list[list] = [[] for _ in self.workers]
        for mini in minis:
            for shares, plan in zip(per_rank, rank_plans(mini, len(self.workers), self.cfg)):
                shares.append((plan, Totals.of(mini)))
        results = _get_all(self._timeout, [w.train_batch.remote(shares) for w, shares in zip(self.workers, per_rank)])
        tokens = sum(r["tokens"] for r in results)
        extra = {f"learn/{k}": sum(r[k] for r in results) for k in ("sd_loss", "pg_loss") if k in results[0]}
        if "is_masked" in results[0]:  # loss.rollout_is_mask_low / _high: the share of tokens the band zeroed
            extra["learn/is_masked_frac"] = sum(r["is_masked"] for r in results) / max(1.0, tokens)
        if "clip_frac" in results[0]:
            extra["learn/clip_frac"] = sum(r["clip_frac"] for r in results) / max(1.0, tokens)
        return {
            **extra,
            "learn/loss": sum(r["loss"] for r in results),
            "learn/grad_norm": results[0]["grad_norm"],
            "learn/skipped_step": results[0]["skipped_step"],
            "learn/lr": results[0]["lr"],
            "learn/rollout_logp_gap_abs": sum(r["logp_gap_abs"] for r in results) / max(1.0, tokens),
            "learn/is_weight_mean": sum(r["is_weight"] for r in results) / max(1.0, tokens),
            "learn/response_tokens": tokens,
        }

    def export_weights(self, directory: str, version: int, teacher: bool = False) -> str:
        """Full student (or teacher) weights as one file; returns its path (rank 0 writes it)."""
        return self.call("export_weights", directory, version, teacher)[0]

    def push_weights(self, transport: str, version: int, bucket_bytes: int, receivers_by_rank: list | None = None) -> dict[str, float]:
        return self.call("push_weights", transport, version, bucket_bytes, receivers_by_rank)[0]

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def weight_group_address(self) -> tuple[str, int]:
        return ray.get(self.workers[0].rendezvous_address.remote())

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Leave the process group cleanly when every rank can, then kill the actors regardless
        (after a rank died, the others may be stuck in a collective that will never finish)."""
        ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=timeout_s)
        for w in self.workers:
            ray.kill(w)


class LearnerTimeout(RuntimeError):
    """A learner call outlived learner.call_timeout_s: a rank is hung (a stuck collective, a dead node)."""


def _get_all(timeout_s: float, refs: list) -> list:
    """ray.get for a collective call: raises as soon as any rank fails, instead of waiting on
    ranks that block forever in a collective with the dead one, and gives up after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise LearnerTimeout(f"{len(pending)} learner rank(s) did not answer within learner.call_timeout_s={timeout_s:g}")
        ray.get(ready)  # raises RayActorError / RayTaskError for a dead or failed rank
    return ray.get(refs)
